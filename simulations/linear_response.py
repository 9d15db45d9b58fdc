"""What the linear-response widening costs and adds on real counts.

For each real-count matrix of the benchmark (thinned as there, top 2,000 genes) and
each k, fits spfa with its defaults and reports the fit's time, the time of
:func:`spfa.linear_response.propagated_variances` inside it, and the median over the
kept factors' entries of the variance added to a slab over the slab's mean-field
variance, for the loadings and the factors.

    python -m simulations.linear_response [--k 10 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from simulations.real_counts import prepare
from simulations.real_data import DATASETS
from spfa import SparseFactorAnalysis, fitting


def run(name: str, k: int, seed: int) -> dict:
    x_train, _, _, info = prepare(name, 2000, seed)
    spent = {}
    original = fitting.propagated_variances

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        spent["seconds"] = time.perf_counter() - start
        return out

    est = SparseFactorAnalysis(k, random_state=seed)
    fitting.propagated_variances = timed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            start = time.perf_counter()
            est.fit(x_train)
            seconds = time.perf_counter() - start
    finally:
        fitting.propagated_variances = original
    model, kept = est.get_model(), est.active_components_
    gain = {}
    for side in ("loadings", "factors"):
        slab_var = getattr(model, side).posterior().slab_sd[:, kept] ** 2
        gain[side] = float(np.median(getattr(est, f"{side}_propagated_var_")[:, kept] / slab_var))
    return dict(
        dataset=name,
        shape=(info["n_cells"], info["n_genes"]),
        k=k,
        fit=seconds,
        propagation=spent["seconds"],
        **gain,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m simulations.linear_response", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--k", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(
        f"{'data':<18} {'cells x genes':>13} {'k':>3} {'fit s':>7} {'widen s':>7} "
        f"{'share':>6} {'L gain':>6} {'F gain':>6}"
    )
    for name in sorted(DATASETS):
        for k in args.k:
            r = run(name, k, args.seed)
            shape = f"{r['shape'][0]} x {r['shape'][1]}"
            print(
                f"{name:<18} {shape:>13} {k:>3} {r['fit']:7.2f} {r['propagation']:7.2f} "
                f"{r['propagation'] / r['fit']:6.1%} {r['loadings']:6.3f} {r['factors']:6.3f}",
                flush=True,
            )
    print("(gain: median added variance / mean-field slab variance, kept factors' entries)")


if __name__ == "__main__":
    main()
