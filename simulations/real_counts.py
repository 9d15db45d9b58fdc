"""spfa and its peers on real count matrices, scored by binomial thinning.

Each data set of ``simulations/real_data.py`` (count matrices that ship inside
PyPI packages; ``pip install -e .[bench]``) is cut to its ``--n-genes`` genes of
largest total count (genes with no count dropped) and split by binomial
thinning (:func:`spfa.heldout.thin_counts`): ``x_train ~ Binomial(x, 1/2)``,
``x_test = x - x_train``. Every method is fitted to ``x_train`` and scored, in
the same run and the same way, by the mean Poisson log-likelihood per entry of
``x_test`` (all entries, zeros included) at the method's fitted mean for the
training rows. Under a Poisson model the two halves are independent with the
same mean, so a method that recovers the mean of ``x_train`` scores best.

Methods (``--methods``):

* ``spfa``: ``SparseFactorAnalysis(n_components=k, random_state=seed)`` with all
  its defaults (Poisson, exp link, point-normal priors, size factors from library
  sizes: ``s`` = library size of ``x_train`` over its mean); fitted mean
  ``inverse_transform(loadings_) * training_size_factors_``. Variants:
  ``--spfa-variants key=value[,key=value...]`` (estimator parameters, e.g.
  ``link=softplus`` or ``likelihood=negative_binomial,link=softplus`` or
  ``library_size=False``) and ``--priors prior ...``, each otherwise at defaults;
* ``glmpca`` (Poisson, log link, ``s`` as offsets), ``nmf_kl`` (NMF with the KL
  loss, mean ``W H``) and ``mofa+`` (Poisson likelihood on the counts, no size
  factors): ``simulations/peers.py``;
* ``null``: gene means times the cell's size factor (the floor).

A method that fails is reported with the reason, never dropped. Fitted means
are floored at 1e-10 before scoring (noted where it touches a test count).

Per spfa fit also: ``n_effective_components_``; the median over kept factors of
the share of genes with ``factors_pip_ >= 0.5``; and the share of each kept
factor's top-10 genes (by ``|components_|`` among PIP >= 0.5) that are among the
20 most abundant genes (total count of ``x_train``), averaged over factors.
Fit seconds for every method. Writes ``<out>/real_counts.json`` and
``<out>/real_counts.md``.

    python -m simulations.real_counts [--datasets pbmc68k_reduced celltypist_sample]
        [--k 10] [--n-genes 2000] [--seed 0] [--methods spfa glmpca nmf_kl mofa+ null]
        [--spfa-variants link=softplus likelihood=negative_binomial]
        [--priors point_exponential normal_mixture] [--max-iter N] [--out runs/real_counts]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn.exceptions import ConvergenceWarning

from simulations import real_data
from simulations.peers import PEERS, NotApplicable, NotInstalled
from spfa import PRIORS, SparseFactorAnalysis
from spfa.heldout import thin_counts

logger = logging.getLogger("simulations.real_counts")

#: share of each count that goes to the test half
FRACTION = 0.5
#: fitted means are floored here before scoring
MEAN_FLOOR = 1e-10
#: genes with PIP at least this are "in" a factor
MIN_PIP = 0.5
N_TOP, N_ABUNDANT = 10, 20
METHODS = ("spfa", "glmpca", "nmf_kl", "mofa+", "null")


def heldout_poisson(x_test: np.ndarray, mean: np.ndarray) -> tuple[float, int]:
    """Mean Poisson log-likelihood per entry of ``x_test`` at ``mean`` (floored), and
    the number of test counts > 0 whose mean had to be floored."""
    floored = int(np.sum((mean < MEAN_FLOOR) & (x_test > 0)))
    return float(stats.poisson.logpmf(x_test, np.maximum(mean, MEAN_FLOOR)).mean()), floored


def factor_summaries(est, abundant: np.ndarray) -> dict:
    """Sparsity of the kept factors and how much of their top genes are the most abundant."""
    kept = np.flatnonzero(est.active_components_)
    pip, comp = est.factors_pip_, est.components_
    shares, overlaps = [], []
    for j in kept:
        inside = np.flatnonzero(pip[:, j] >= MIN_PIP)
        shares.append(inside.size / pip.shape[0])
        if inside.size:
            top = inside[np.argsort(-np.abs(comp[j, inside]), kind="stable")[:N_TOP]]
            overlaps.append(np.isin(top, abundant).mean())
    return {
        "n_effective": int(est.n_effective_components_),
        "pip_share": float(np.median(shares)) if shares else float("nan"),
        "top_abundant": float(np.mean(overlaps)) if overlaps else float("nan"),
        "n_iter": int(est.n_iter_),
    }


def fit_spfa(x, k, seed, max_iter, **kw):
    """spfa on ``x`` (its own size factors): (fitted mean of the rows, estimator, seconds)."""
    if max_iter is not None:
        kw["max_iter"] = max_iter
    est = SparseFactorAnalysis(n_components=k, random_state=seed, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        est.fit(x)
        seconds = time.perf_counter() - start
    s = est.training_size_factors_
    mean = est.inverse_transform(est.loadings_)
    return mean if s is None else mean * s[:, None], est, seconds


def parse_variant(text: str) -> dict:
    """``"likelihood=negative_binomial,library_size=False"`` -> keyword arguments."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"spfa variant {text!r}: expected key=value[,key=value...]")
        lowered = value.lower()
        if lowered in ("true", "false"):
            out[key] = lowered == "true"
        else:
            try:
                out[key] = float(value) if "." in value or "e" in lowered else int(value)
            except ValueError:
                out[key] = value
    return out


def spfa_methods(args) -> dict[str, dict]:
    """name -> keyword arguments of SparseFactorAnalysis for each spfa fit asked for."""
    out = {"spfa": {}} if "spfa" in args.methods else {}
    for variant in args.spfa_variants:
        out[f"spfa {variant}"] = parse_variant(variant)
    for prior in args.priors:
        out[f"spfa prior={prior}"] = dict(prior=prior)
    return out


def prepare(name: str, n_genes: int, seed: int):
    """Load, select genes, thin; drop the cells and genes that ``x_train`` leaves empty."""
    counts, genes, description = real_data.load(name)
    keep = real_data.select_genes(counts, n_genes)
    x = counts[:, keep].toarray()
    genes = genes[keep]
    x = x[x.sum(axis=1) > 0]
    # thin_counts returns (x - b, b) with b ~ Binomial(x, FRACTION): b is x_train
    x_test, x_train = thin_counts(x, FRACTION, random_state=seed)
    rows, cols = x_train.sum(axis=1) > 0, x_train.sum(axis=0) > 0
    info = {
        "dataset": name,
        "description": description,
        "shape_raw": list(counts.shape),
        "n_cells": int(rows.sum()),
        "n_genes": int(cols.sum()),
        "cells_dropped": int(counts.shape[0] - rows.sum()),
        "genes_dropped_train_empty": int((~cols).sum()),
        "density": float(np.mean(x[rows][:, cols] > 0)),
        "mean_count": float(x[rows][:, cols].mean()),
    }
    return x_train[rows][:, cols], x_test[rows][:, cols], genes[cols], info


def run_dataset(name: str, args) -> tuple[dict, list[dict]]:
    x_train, x_test, _, info = prepare(name, args.n_genes, args.seed)
    lib = x_train.sum(axis=1)
    s = lib / lib.mean()
    abundant = np.argsort(-x_train.sum(axis=0), kind="stable")[:N_ABUNDANT]
    k, seed = args.k, args.seed
    logger.info(
        f"{name}: {info['n_cells']} cells x {info['n_genes']} genes, "
        f"{100 * info['density']:.1f} % non-zero, mean count {info['mean_count']:.2f}"
    )
    rows = []

    def record(method, fn):
        row = {"dataset": name, "method": method, "status": "ok", "note": ""}
        try:
            mean, extra, seconds, note = fn()
        except NotInstalled as err:
            row.update(status="not installed", note=str(err))
        except NotApplicable as err:
            row.update(status="not applicable", note=str(err))
        except Exception as err:  # a method that crashes is reported, not dropped
            traceback.print_exc(limit=3)
            row.update(status="failed", note=f"{type(err).__name__}: {err}"[:300])
        else:
            if not np.all(np.isfinite(mean)):
                row.update(status="failed", note="non-finite fitted mean", seconds=seconds)
            else:
                loglik, floored = heldout_poisson(x_test, mean)
                notes = [note] if note else []
                if floored:
                    notes.append(f"{floored} test counts at a mean < {MEAN_FLOOR:g}")
                row.update(loglik=loglik, seconds=seconds, note="; ".join(notes), **extra)
        rows.append(row)
        shown = f"{row['loglik']:.4f}" if "loglik" in row else row["status"]
        logger.info(f"  {method:<32} {shown:>10}  {row.get('seconds', float('nan')):7.1f} s")

    def null():
        start = time.perf_counter()
        mean = s[:, None] * x_train.mean(axis=0)[None, :]
        return mean, {}, time.perf_counter() - start, ""

    def spfa_fit(kw):
        def fn():
            mean, est, seconds = fit_spfa(x_train, k, seed, args.max_iter, **kw)
            return mean, factor_summaries(est, abundant), seconds, ""

        return fn

    def peer(method):
        def fn():
            kw = {} if args.max_iter is None else {"max_iter": args.max_iter}
            fit = PEERS[method](x_train, k, "poisson", s, seed, **kw)
            return fit.mean, {}, fit.seconds, fit.note

        return fn

    if "null" in args.methods:
        record("null", null)
    for method, kw in spfa_methods(args).items():
        record(method, spfa_fit(kw))
    for method in ("glmpca", "nmf_kl", "mofa+"):
        if method in args.methods:
            record(method, peer(method))
    base = next((r["loglik"] for r in rows if r["method"] == "null" and "loglik" in r), None)
    for row in rows:
        if base is not None and "loglik" in row:
            row["vs_null"] = row["loglik"] - base
    return info, rows


def fmt(row, key, spec):
    """``row[key]`` formatted by ``spec`` for a markdown table; empty if missing or NaN."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return f"{value:{spec}}"


def table(infos: list[dict], rows: list[dict], args) -> str:
    lines = [
        f"Held-out Poisson log-likelihood per entry of x_test (binomial thinning, 1/2), "
        f"k = {args.k}, seed {args.seed}, max_iter "
        f"{'defaults' if args.max_iter is None else args.max_iter}.",
        "",
    ]
    for info in infos:
        if info.get("status") == "unavailable":
            lines.append(f"- **{info['dataset']}**: unavailable ({info['note']})")
            continue
        lines.append(
            f"- **{info['dataset']}**: {info['n_cells']} cells x {info['n_genes']} genes "
            f"({100 * info['density']:.1f} % non-zero, mean count {info['mean_count']:.2f}; "
            f"{info['cells_dropped']} cells and {info['genes_dropped_train_empty']} genes "
            f"dropped). {info['description']}"
        )
    lines += [
        "",
        "| data | method | held-out loglik / entry | vs null | fit s | n_eff | "
        f"median share PIP>={MIN_PIP} | top-{N_TOP} in top-{N_ABUNDANT} abundant | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        loglik = fmt(row, "loglik", ".4f") if row["status"] == "ok" else row["status"]
        lines.append(
            f"| {row['dataset']} | {row['method']} | {loglik} | {fmt(row, 'vs_null', '+.4f')} "
            f"| {fmt(row, 'seconds', '.1f')} | {fmt(row, 'n_effective', 'd')} "
            f"| {fmt(row, 'pip_share', '.3f')} | {fmt(row, 'top_abundant', '.2f')} "
            f"| {row['note']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m simulations.real_counts", description=__doc__)
    parser.add_argument(
        "--datasets", nargs="+", default=list(real_data.DATASETS), choices=list(real_data.DATASETS)
    )
    parser.add_argument("--k", type=int, default=10, help="number of factors")
    parser.add_argument("--n-genes", type=int, default=2000, help="top genes by total count")
    parser.add_argument("--seed", type=int, default=0, help="seed of the thinning and the fits")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--spfa-variants",
        nargs="*",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="extra spfa fits, e.g. link=softplus likelihood=negative_binomial,link=softplus",
    )
    parser.add_argument(
        "--priors", nargs="*", default=[], choices=list(PRIORS), help="extra spfa fits"
    )
    parser.add_argument(
        "--max-iter", type=int, default=None, help="iterations of every method (default: theirs)"
    )
    parser.add_argument("--out", default="runs/real_counts", help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    infos, rows = [], []
    for name in args.datasets:
        try:
            info, mine = run_dataset(name, args)
        except real_data.DatasetUnavailable as err:
            logger.info(f"{name}: unavailable ({err})")
            info = {"dataset": name, "status": "unavailable", "note": str(err)}
            mine = [{"dataset": name, "method": "-", "status": "unavailable", "note": str(err)}]
        infos.append(info)
        rows += mine
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {key: value for key, value in vars(args).items() if key != "out"}
    (out / "real_counts.json").write_text(
        json.dumps({"settings": settings, "datasets": infos, "rows": rows}, indent=1)
    )
    text = table(infos, rows, args)
    (out / "real_counts.md").write_text(text)
    logger.info("\n" + text)
    logger.info(f"wrote {out / 'real_counts.json'} and {out / 'real_counts.md'}")
    return rows


if __name__ == "__main__":
    main()
