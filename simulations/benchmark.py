"""Benchmark spfa against its peers on planted-truth simulations.

Peers (``simulations/peers.py``): truncated SVD / PCA, FactorAnalysis and NMF
with KL loss (scikit-learn), and, when the optional ``bench`` extra is
installed (``pip install -e .[bench]``), GLM-PCA (``glmpca``) and MOFA+
(``mofapy2``, spike-and-slab weights). A peer that is not installed, does not
apply to a design, or fails is listed with its reason, never dropped.

Designs: the sanity-check designs (n=100, p=500, k=3; see
``sanity_checks.py``) and, with ``--large``, a Poisson simulation with
per-cell size factors and per-gene baselines (5,000 x 2,000, k=10).

Per fit: relative error of the estimated mean against the truth; mean ``|cos|``
of matched factors; support recovery (average precision of PIPs or
``|estimate|``) for L and F; held-out log-likelihood (mean per entry, at the
plug-in mean, under the method's own observation model) on 5 % of entries
masked during the fit, for the methods that accept missing entries (the others
see every entry, which can only help them); wall time. Writes
``<out>/benchmark.csv`` and ``<out>/benchmark.md``.

Usage::

    python -m simulations.benchmark [--n-reps 3] [--large] [--out runs/benchmark]
"""

from __future__ import annotations

import argparse
import csv
import traceback
from pathlib import Path

import numpy as np

from simulations.peers import (
    ACCEPTS_MISSING,
    PEERS,
    NotApplicable,
    NotInstalled,
    fit_spfa,
    heldout_loglik,
)
from simulations.sanity_checks import DESIGNS
from spfa.evaluation import match_factors, relative_error, support_recovery
from spfa.simulate import simulate

#: the large design: Poisson with size factors and per-gene baselines
LARGE = dict(
    likelihood="poisson",
    n=5000,
    p=2000,
    pi0=tuple(np.linspace(0.5, 0.95, 10).round(2)),
    slab_sd=(1.0,) * 10,
    size_factors="random",
    intercept="random",
)
HELDOUT_FRACTION = 0.05
METRICS = ("error", "similarity", "loadings_ap", "factors_ap", "heldout_loglik", "seconds")


def run_method(name, fn, sim, x_masked, heldout, k, seed, max_iter, spfa_kw=None):
    lik = sim.likelihood
    row = dict(method=name, status="ok", note="")
    try:
        if name == "spfa":
            fit = fit_spfa(x_masked, k, lik, sim.size_factors, seed, **(spfa_kw or {}))
        else:
            kw = {} if name in ("truncated_svd", "factor_analysis") else dict(max_iter=max_iter)
            x_in = x_masked if name in ACCEPTS_MISSING else sim.x
            fit = fn(x_in, k, lik, sim.size_factors, seed, **kw)
    except NotApplicable as err:
        return dict(row, status="not applicable", note=str(err))
    except NotInstalled as err:
        return dict(row, status="not installed", note=str(err))
    except Exception as err:  # a peer that crashes is reported, not dropped
        traceback.print_exc(limit=2)
        return dict(row, status="failed", note=f"{type(err).__name__}: {err}"[:200])
    if not np.all(np.isfinite(fit.mean)):
        return dict(row, status="failed", note="non-finite fitted mean", seconds=fit.seconds)
    match = match_factors(fit.loadings, fit.factors, sim.loadings, sim.factors)
    row.update(
        error=relative_error(fit.mean, sim.mean),
        similarity=float(np.mean(match.similarity)),
        loadings_ap=support_recovery(match.reorder(fit.loadings_score), sim.loadings)[
            "average_precision"
        ],
        factors_ap=support_recovery(match.reorder(fit.factors_score), sim.factors)[
            "average_precision"
        ],
        heldout_loglik=heldout_loglik(fit, sim.x, heldout, lik),
        seconds=fit.seconds,
        note=fit.note,
    )
    return row


def markdown(rows) -> str:
    """Mean over replicates per design and method; non-ok methods keep their reason."""
    lines = [
        "| design | method | status | rel. error ↓ | mean abs cos ↑ | AP(L) ↑ | AP(F) ↑ "
        "| held-out loglik ↑ | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for design in dict.fromkeys(r["design"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["design"] == design):
            rs = [r for r in rows if r["design"] == design and r["method"] == method]
            ok = [r for r in rs if r["status"] == "ok"]
            notes = "; ".join(sorted({r["note"] for r in rs if r["note"]}))
            if not ok:
                status = f"{rs[0]['status']}: {notes}" if notes else rs[0]["status"]
                lines.append(f"| {design} | {method} | {status} |  |  |  |  |  |  |")
                continue
            status = f"ok ({len(ok)}/{len(rs)})" + (f"; {notes}" if notes else "")
            cells = []
            for m in METRICS:
                v = np.array([r[m] for r in ok], dtype=float)
                cells.append("n/a" if np.all(np.isnan(v)) else f"{np.nanmean(v):.3g}")
            lines.append(f"| {design} | {method} | {status} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m simulations.benchmark", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seed", type=int, default=1, help="first replicate's seed")
    parser.add_argument("--n-reps", type=int, default=3, help="replicates per small design")
    parser.add_argument("--out", default="runs/benchmark", help="output folder")
    parser.add_argument(
        "--designs", nargs="*", default=list(DESIGNS), choices=list(DESIGNS), help="small designs"
    )
    parser.add_argument("--large", action="store_true", help="add the 5,000 x 2,000 design")
    parser.add_argument("--methods", nargs="+", default=["spfa", *PEERS], choices=["spfa", *PEERS])
    parser.add_argument("--max-iter", type=int, default=1000, help="iterative peers' cap")
    parser.add_argument(
        "--large-batch-size",
        type=int,
        default=128,
        help="spfa's batch_size on the large design (0: full batch)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    jobs = [
        (d, seed, DESIGNS[d], 3)
        for d in args.designs
        for seed in range(args.seed, args.seed + args.n_reps)
    ]
    if args.large:
        jobs.append(("poisson_large", args.seed, LARGE, 10))
    rows = []
    for design, seed, spec, k in jobs:
        sim = simulate(seed=seed, **spec)
        rng = np.random.default_rng(10_000 + seed)
        heldout = rng.uniform(size=sim.x.shape) < HELDOUT_FRACTION
        x_masked = np.where(heldout, np.nan, sim.x)
        n, p = sim.x.shape
        print(f"\n== {design} seed {seed} ({n} x {p}, k={k}) ==", flush=True)
        for name in args.methods:
            fn = PEERS.get(name)
            spfa_kw = {}
            if design == "poisson_large" and args.large_batch_size > 0:
                spfa_kw["batch_size"] = args.large_batch_size
            row = run_method(name, fn, sim, x_masked, heldout, k, seed, args.max_iter, spfa_kw)
            row = dict(design=design, seed=seed, **row)
            rows.append(row)
            vals = "  ".join(f"{m}={row[m]:.3g}" for m in METRICS if isinstance(row.get(m), float))
            print(f"  {name:<16} {row['status']:<15} {vals} {row['note']}", flush=True)

    fields = ["design", "seed", "method", "status", *METRICS, "note"]
    with open(out / "benchmark.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    (out / "benchmark.md").write_text(table)
    print("\n" + table)
    print(f"wrote {out / 'benchmark.csv'} and {out / 'benchmark.md'}")
    return rows


if __name__ == "__main__":
    main()
