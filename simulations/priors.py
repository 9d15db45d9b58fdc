"""The prior families on non-negative parts-based counts, against NMF-KL.

Counts ``x ~ Poisson(softplus(b + L F^T))`` with sparse non-negative ``L`` and
``F`` (:func:`spfa.simulate.simulate_parts`: n = 200, p = 500, k = 4, 70 % /
90 % zeros, exponential non-zeros of mean 1.5, baseline ``b = -2``). Each
family of spfa is fitted with ``n_components = k`` and defaults otherwise;
scikit-learn's NMF with the Kullback--Leibler loss (the Poisson NMF) is fitted
with ``k`` and ``k + 1`` components (the extra one can take the baseline).
Figures of merit: relative error of the fitted mean against the true rate,
the mean |cos| of the matched factors, the smallest entry of ``E[L]`` and
``E[F]`` (non-negativity) and wall time.

    python -m simulations.priors [--n-reps 3] [--seed 1] [--out runs/priors]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.decomposition import NMF
from sklearn.exceptions import ConvergenceWarning

from spfa import PRIORS, SparseFactorAnalysis
from spfa.evaluation import match_factors, relative_error
from spfa.simulate import MATCHED_FIT, simulate_parts

logger = logging.getLogger("simulations.priors")
K = 4


def _nmf(x, k, seed):
    nmf = NMF(
        k,
        beta_loss="kullback-leibler",
        solver="mu",
        init="nndsvda",
        max_iter=2000,
        random_state=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        w = nmf.fit_transform(x)
    return w, nmf.components_.T


def run(seed: int) -> list[dict]:
    """Every method on one replicate; one record per method."""
    sim = simulate_parts(k=K, seed=seed)
    rows = []

    def record(method, mean, loadings, factors, seconds):
        match = match_factors(loadings, factors, sim.loadings, sim.factors)
        rows.append(
            {
                "seed": seed,
                "method": method,
                "error": relative_error(mean, sim.mean),
                "abs_cos": float(np.mean(match.similarity)),
                "min_loading": float(loadings.min()),
                "min_factor": float(factors.min()),
                "seconds": seconds,
            }
        )

    for k in (K, K + 1):
        start = time.perf_counter()
        w, h = _nmf(sim.x, k, seed)
        record(f"nmf_kl (k={k})", w @ h.T, w, h, time.perf_counter() - start)
    for prior in PRIORS:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est = SparseFactorAnalysis(
                K, prior=prior, random_state=seed, device="cpu", **MATCHED_FIT
            )
            est.fit(sim.x)
        seconds = time.perf_counter() - start
        mean = est.inverse_transform(est.loadings_)
        record(f"spfa {prior}", mean, est.loadings_, est.components_.T, seconds)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m simulations.priors", description=__doc__)
    parser.add_argument("--seed", type=int, default=1, help="first replicate's seed")
    parser.add_argument("--n-reps", type=int, default=3)
    parser.add_argument("--out", default="runs/priors", help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for seed in range(args.seed, args.seed + args.n_reps):
        rows += run(seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "priors.json").write_text(json.dumps(rows, indent=1))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    logger.info("| method | rel. error | mean abs cos | min E[L] | min E[F] | seconds |")
    logger.info("|---|---|---|---|---|---|")
    for method in methods:
        mine = [r for r in rows if r["method"] == method]

        def avg(key, mine=mine):
            return float(np.mean([r[key] for r in mine]))

        logger.info(
            f"| {method} | {avg('error'):.3f} | {avg('abs_cos'):.3f} | "
            f"{min(r['min_loading'] for r in mine):.3g} | "
            f"{min(r['min_factor'] for r in mine):.3g} | {avg('seconds'):.1f} |"
        )
    return rows


if __name__ == "__main__":
    main()
