"""Speed: spfa against NMF-KL, GLM-PCA and MOFA+ in one run, as ratios.

The project's one speed benchmark. Every method is fitted in this process, one
after the other, on the same data; a small untimed spfa fit (``fit``,
``transform`` and ``score`` of a 50 x 50 simulation, 5 iterations) comes first so
that no timed method pays torch's one-off start-up. Three kinds of data:

* **real counts**: each data set of ``simulations/real_data.py`` (``pip install
  -e .[bench]``), cut to its ``--n-genes`` genes of largest total count and split
  by binomial thinning exactly as :func:`simulations.real_counts.prepare` does.
  Each method is fitted to ``x_train`` and scored by the mean Poisson
  log-likelihood per entry of ``x_test`` at its fitted mean
  (:func:`simulations.real_counts.heldout_poisson`). Size factors: spfa computes
  its own (library sizes, its default); GLM-PCA gets the same ones
  (``s`` = library size of ``x_train`` over its mean) as offsets;
* **simulation**: the benchmark's large design
  (:data:`simulations.benchmark.LARGE`: Poisson counts ``s softplus(L F^T + b)``
  with log-normal size factors ``s`` and per-gene baselines ``b``) at
  ``--sim-n`` x ``--sim-p`` (5,000 x 2,000) with ``--k`` factors, drawn with
  :func:`spfa.simulate.simulate`. spfa and GLM-PCA get the true size factors.
  Score: relative error ``||mean - E[x]||_F / ||E[x]||_F`` of the fitted mean
  against the true mean over all entries (:func:`spfa.evaluation.relative_error`,
  the benchmark's error).

* **a minibatch fit**: sparse Poisson counts with size factors
  (:func:`spfa.simulate.simulate_sparse_counts`, the scale benchmark's design) at
  ``--minibatch-n`` x ``--minibatch-p`` (20,000 x 2,000) with ``--batch-size`` 128, by
  spfa with its defaults and with ``MATCHED_FIT``: seconds of the start, training and
  pruning, pruning's share of the fit, the start's peak numpy memory
  (``tracemalloc``) against one batch's dense float32 block, the factors kept and the
  error of the fitted mean on 2,000 random rows.

Methods (``--methods``):

* ``spfa``: ``SparseFactorAnalysis(n_components=k, random_state=seed)`` with its
  defaults plus ``--spfa-params``; fitted mean
  ``inverse_transform(loadings_) * training_size_factors_``. On the simulation
  also ``spfa matched``: the same with :data:`spfa.simulate.MATCHED_FIT` (the
  softplus link that generated the data). After the fit, ``transform(x)`` and
  ``score(x)`` of the training rows are timed separately;
* ``nmf_kl``, ``glmpca``, ``mofa+``: ``simulations/peers.py``, at their defaults
  (1,000 iterations at most). MOFA+ sees the raw counts (no size factors).

Per data set a table: fit seconds, their ratio to NMF-KL's fit seconds, the
held-out log-likelihood (real counts) or the error (simulation), and for spfa
the seconds of ``transform`` and ``score`` and their share of its fit's
seconds. A method that is not installed or fails is listed with the reason,
never dropped. Writes ``<out>/speed.json`` and ``<out>/speed.md``.

    python -m simulations.speed [--datasets pbmc68k_reduced celltypist_sample]
        [--k 10] [--n-genes 2000] [--sim-n 5000] [--sim-p 2000] [--seed 0]
        [--methods spfa nmf_kl glmpca mofa+] [--spfa-params key=value,...]
        [--minibatch-n 20000] [--minibatch-p 2000] [--batch-size 128] [--out runs/speed]

``--datasets`` with no names (or ``--sim-n 0``, ``--minibatch-n 0``) leaves out the
real counts (the simulation, the minibatch fit).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
import traceback
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from simulations import real_data
from simulations.benchmark import LARGE
from simulations.peers import PEERS, NotApplicable, NotInstalled
from simulations.real_counts import (
    MEAN_FLOOR,
    fmt,
    heldout_poisson,
    parse_variant,
    prepare,
)
from spfa import SparseFactorAnalysis
from spfa.evaluation import relative_error
from spfa.simulate import MATCHED_FIT, simulate, simulate_sparse_counts

logger = logging.getLogger("simulations.speed")

METHODS = ("spfa", "nmf_kl", "glmpca", "mofa+")
#: the peer every fit time is divided by
REFERENCE = "nmf_kl"
#: rows and columns of the untimed warm-up fit, and its iterations
WARM_UP_SHAPE, WARM_UP_ITER = (50, 50), 5


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def warm_up(k: int, seed: int, params: dict) -> None:
    """An untimed spfa fit, transform and score of a small simulation."""
    n, p = WARM_UP_SHAPE
    x = simulate(seed=seed, **simulation_design(n, p, min(k, n, p))).x
    kw = {**params, "max_iter": WARM_UP_ITER}
    est = SparseFactorAnalysis(min(k, n, p), random_state=seed, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(x)
        est.transform(x)
        est.score(x)


def time_spfa(x, k: int, seed: int, params: dict, size_factors=None) -> dict:
    """Fit spfa to ``x`` and time ``fit``, then ``transform(x)`` and ``score(x)``.

    Returns the fitted mean of the rows (size factors included), the three times
    in seconds and a few facts about the fit.
    """
    est = SparseFactorAnalysis(n_components=k, random_state=seed, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        _, seconds = _timed(lambda: est.fit(x, size_factors=size_factors))
        _, transform_seconds = _timed(lambda: est.transform(x, size_factors=size_factors))
        _, score_seconds = _timed(lambda: est.score(x, size_factors=size_factors))
    s = est.training_size_factors_
    mean = est.inverse_transform(est.loadings_)
    return {
        "mean": mean if s is None else mean * s[:, None],
        "seconds": seconds,
        "transform_seconds": transform_seconds,
        "score_seconds": score_seconds,
        "transform_share": transform_seconds / seconds,
        "score_share": score_seconds / seconds,
        "n_iter": int(est.n_iter_),
        "n_effective": int(est.n_effective_components_),
    }


class Runner:
    """Fits methods on one data set and collects a row per method (failures included)."""

    def __init__(self, name: str, scorer, score_key: str):
        self.name, self.scorer, self.score_key = name, scorer, score_key
        self.rows: list[dict] = []

    def record(self, method: str, fn) -> None:
        row = {"dataset": self.name, "method": method, "status": "ok", "note": ""}
        try:
            out = fn()
        except NotInstalled as err:
            row.update(status="not installed", note=str(err))
        except NotApplicable as err:
            row.update(status="not applicable", note=str(err))
        except Exception as err:  # a method that crashes is reported, not dropped
            traceback.print_exc(limit=3)
            row.update(status="failed", note=f"{type(err).__name__}: {err}"[:300])
        else:
            mean = out.pop("mean")
            notes = [out.pop("note", "")]
            if not np.all(np.isfinite(mean)):
                row.update(status="failed", note="non-finite fitted mean", **out)
            else:
                value, note = self.scorer(mean)
                row.update({self.score_key: value}, **out)
                notes.append(note)
                row["note"] = "; ".join(filter(None, notes))
        self.rows.append(row)
        shown = f"{row[self.score_key]:.4f}" if self.score_key in row else row["status"]
        logger.info(f"  {method:<14} {shown:>10}  {row.get('seconds', float('nan')):7.1f} s")

    def peer(self, method: str, x, k: int, size_factors, seed: int) -> None:
        def fn():
            fit = PEERS[method](x, k, "poisson", size_factors, seed)
            return {"mean": fit.mean, "seconds": fit.seconds, "note": fit.note}

        self.record(method, fn)

    def finish(self) -> list[dict]:
        """Add each fit's time over the reference peer's."""
        ref = next((r for r in self.rows if r["method"] == REFERENCE and "seconds" in r), None)
        for row in self.rows:
            if ref is not None and "seconds" in row and row["status"] == "ok":
                row["vs_reference"] = row["seconds"] / ref["seconds"]
        return self.rows


def run_real(name: str, args, params: dict) -> tuple[dict, list[dict]]:
    x_train, x_test, _, info = prepare(name, args.n_genes, args.seed)
    info["kind"] = "real counts"
    lib = x_train.sum(axis=1)
    s = lib / lib.mean()
    logger.info(f"{name}: {info['n_cells']} cells x {info['n_genes']} genes (thinned, 1/2)")

    def scorer(mean):
        loglik, floored = heldout_poisson(x_test, mean)
        return loglik, f"{floored} test counts at a mean < {MEAN_FLOOR:g}" if floored else ""

    run = Runner(name, scorer, "loglik")
    if "spfa" in args.methods:
        run.record("spfa", lambda: time_spfa(x_train, args.k, args.seed, params))
    for method in METHODS[1:]:
        if method in args.methods:
            run.peer(method, x_train, args.k, s, args.seed)
    return info, run.finish()


def simulation_design(n: int, p: int, k: int) -> dict:
    """The benchmark's large design at ``n x p`` with ``k`` factors."""
    return {
        **LARGE,
        "n": n,
        "p": p,
        "pi0": tuple(np.linspace(0.5, 0.95, k).round(2)),
        "slab_sd": (1.0,) * k,
    }


def run_simulation(args, params: dict) -> tuple[dict, list[dict]]:
    n, p, k = args.sim_n, args.sim_p, args.k
    sim = simulate(seed=args.seed, **simulation_design(n, p, k))
    x, s = sim.x, sim.size_factors
    name = f"simulation {n} x {p}"
    info = {
        "dataset": name,
        "kind": "simulation",
        "description": "simulations.benchmark.LARGE: Poisson, s softplus(L F^T + b), "
        f"k = {k}, seed {args.seed}",
        "n_cells": n,
        "n_genes": p,
        "density": float(np.mean(x > 0)),
        "mean_count": float(x.mean()),
    }
    logger.info(f"{name}: {100 * info['density']:.1f} % non-zero, mean {info['mean_count']:.2f}")

    def scorer(mean):
        return relative_error(mean, sim.mean), ""

    run = Runner(name, scorer, "error")
    if "spfa" in args.methods:
        for method, kw in (("spfa", params), ("spfa matched", {**MATCHED_FIT, **params})):
            run.record(method, lambda kw=kw: time_spfa(x, k, args.seed, kw, size_factors=s))
    for method in METHODS[1:]:
        if method in args.methods:
            run.peer(method, x, k, s, args.seed)
    return info, run.finish()


@contextlib.contextmanager
def _phases(record: dict):
    """Time the fit's phases (:mod:`spfa.fitting`'s start, training and pruning) and
    trace the start's peak numpy memory (``tracemalloc``) while the block runs."""
    import spfa.fitting as fitting

    names = ("compute_start", "apply_start", "_train", "prune_and_rank")
    originals = {name: getattr(fitting, name) for name in names}

    def wrap(name):
        def timed(*args, **kwargs):
            start = name in ("compute_start", "apply_start")
            if start:
                tracemalloc.start()
            t0 = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                record[name] = record.get(name, 0.0) + time.perf_counter() - t0
                if start:
                    peak = tracemalloc.get_traced_memory()[1] / 2**20
                    tracemalloc.stop()
                    record["start_peak_mib"] = max(record.get("start_peak_mib", 0.0), peak)

        return timed

    for name in names:
        setattr(fitting, name, wrap(name))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(fitting, name, fn)


def run_minibatch(args, params: dict) -> tuple[dict, list[dict]]:
    """A minibatch fit of sparse counts (:func:`spfa.simulate.simulate_sparse_counts`,
    the scale benchmark's design): where its time goes, and the start's memory."""
    n, p, k, b = args.minibatch_n, args.minibatch_p, args.k, args.batch_size
    sim = simulate_sparse_counts(n, p, k, seed=args.seed)
    rows = np.sort(np.random.default_rng(args.seed).choice(n, min(n, 2000), replace=False))
    truth = sim.mean(rows)
    name = f"minibatch {n} x {p}"
    info = {
        "dataset": name,
        "kind": "minibatch",
        "n_cells": n,
        "n_genes": p,
        "batch_size": b,
        "density": sim.x.nnz / (n * p),
        "batch_block_mib": b * p * 4 / 2**20,
    }
    out = []
    for method, kw in (("spfa", params), ("spfa matched", {**MATCHED_FIT, **params})):
        record: dict = {}
        est = SparseFactorAnalysis(k, batch_size=b, random_state=args.seed, **kw)
        with warnings.catch_warnings(), _phases(record):
            warnings.simplefilter("ignore", ConvergenceWarning)
            _, seconds = _timed(lambda est=est: est.fit(sim.x, size_factors=sim.size_factors))
        fitted = est.inverse_transform(est.loadings_[rows]) * sim.size_factors[rows, None]
        start = record.get("compute_start", 0.0) + record.get("apply_start", 0.0)
        row = {
            "dataset": name,
            "method": method,
            "status": "ok",
            "note": "",
            "seconds": seconds,
            "passes": int(est.n_iter_),
            "start_seconds": start,
            "train_seconds": record.get("_train", 0.0),
            "prune_seconds": record.get("prune_and_rank", 0.0),
            "prune_share": record.get("prune_and_rank", 0.0) / seconds,
            "start_peak_mib": record.get("start_peak_mib", float("nan")),
            "n_effective": int(est.n_effective_components_),
            "error": float(np.linalg.norm(fitted - truth) / np.linalg.norm(truth)),
        }
        logger.info(f"  {method:<16} {row['error']:8.4f} {seconds:8.1f} s")
        out.append(row)
    return info, out


def minibatch_table(info: dict, rows: list[dict]) -> str:
    lines = [
        f"**{info['dataset']}** (batch_size {info['batch_size']}, "
        f"{100 * info['density']:.1f} % non-zero; one batch's dense float32 block "
        f"{info['batch_block_mib']:.2f} MiB)",
        "",
        "| method | fit s | passes | start s | start peak MiB | train s | pruning s "
        "| pruning / fit | kept | error (2,000 rows) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['seconds']:.1f} | {row['passes']} "
            f"| {row['start_seconds']:.1f} | {row['start_peak_mib']:.2f} "
            f"| {row['train_seconds']:.1f} | {row['prune_seconds']:.1f} "
            f"| {row['prune_share']:.1%} | {row['n_effective']} | {row['error']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def table(info: dict, rows: list[dict]) -> str:
    """One markdown table of a data set."""
    sim = info.get("kind") == "simulation"
    if info.get("status") == "unavailable":
        return f"**{info['dataset']}**: unavailable ({info['note']})\n"
    score = "error vs truth" if sim else "held-out loglik / entry"
    lines = [
        f"**{info['dataset']}** ({info['n_cells']} x {info['n_genes']}, "
        f"{100 * info['density']:.1f} % non-zero, mean count {info['mean_count']:.2f})",
        "",
        f"| method | fit s | / {REFERENCE} | {score} | iter | transform s | score s "
        "| transform / fit | score / fit | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        value = fmt(row, "error" if sim else "loglik", ".4f")
        value = value if row["status"] == "ok" else row["status"]
        lines.append(
            f"| {row['method']} | {fmt(row, 'seconds', '.2f')} "
            f"| {fmt(row, 'vs_reference', '.2f')} | {value} | {fmt(row, 'n_iter', 'd')} "
            f"| {fmt(row, 'transform_seconds', '.2f')} | {fmt(row, 'score_seconds', '.2f')} "
            f"| {fmt(row, 'transform_share', '.0%')} | {fmt(row, 'score_share', '.0%')} "
            f"| {row['note']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m simulations.speed", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--datasets", nargs="*", default=list(real_data.DATASETS), choices=list(real_data.DATASETS)
    )
    parser.add_argument("--k", type=int, default=10, help="number of factors")
    parser.add_argument("--n-genes", type=int, default=2000, help="top genes by total count")
    parser.add_argument("--sim-n", type=int, default=5000, help="simulated cells (0: none)")
    parser.add_argument("--sim-p", type=int, default=2000, help="simulated genes")
    parser.add_argument(
        "--minibatch-n", type=int, default=20000, help="cells of the minibatch fit (0: none)"
    )
    parser.add_argument("--minibatch-p", type=int, default=2000, help="its genes")
    parser.add_argument("--batch-size", type=int, default=128, help="its batch_size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the fits")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--spfa-params",
        default="",
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="SparseFactorAnalysis parameters of every spfa fit, e.g. max_iter=500,tol=1e-3",
    )
    parser.add_argument("--out", default="runs/speed", help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = parse_variant(args.spfa_params)
    if "spfa" in args.methods:  # torch's one-off start-up, before any timed fit
        warm_up(args.k, args.seed, params)
    infos, rows = [], []
    for name in args.datasets:
        try:
            info, mine = run_real(name, args, params)
        except real_data.DatasetUnavailable as err:
            logger.info(f"{name}: unavailable ({err})")
            info = {"dataset": name, "status": "unavailable", "note": str(err)}
            mine = [{"dataset": name, "method": "-", "status": "unavailable", "note": str(err)}]
        infos.append(info)
        rows += mine
    if args.sim_n > 0:
        info, mine = run_simulation(args, params)
        infos.append(info)
        rows += mine
    extra = []
    if args.minibatch_n > 0 and "spfa" in args.methods:
        info, mine = run_minibatch(args, params)
        extra.append(minibatch_table(info, mine))
        infos.append(info)
        rows += mine
    header = (
        f"Fit seconds in one process (after an untimed warm-up), k = {args.k}, "
        f"seed {args.seed}, spfa parameters: {params or 'defaults'}; "
        f"/ {REFERENCE} is the fit's seconds over {REFERENCE}'s.\n"
    )
    text = "\n".join(
        [header]
        + [
            table(info, [r for r in rows if r["dataset"] == info["dataset"]])
            for info in infos
            if info.get("kind") != "minibatch"
        ]
        + extra
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {key: value for key, value in vars(args).items() if key != "out"}
    (out / "speed.json").write_text(
        json.dumps({"settings": settings, "datasets": infos, "rows": rows}, indent=1)
    )
    (out / "speed.md").write_text(text)
    logger.info("\n" + text)
    logger.info(f"wrote {out / 'speed.json'} and {out / 'speed.md'}")
    return rows


if __name__ == "__main__":
    main()
