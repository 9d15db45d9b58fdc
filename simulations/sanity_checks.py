"""Reproduce the seed notebook's sanity checks with spfa and print figures of merit.

Design (the notebook's): n=100, p=500, k=3, pi0 = [0.1, 0.9, 0.99], slab sd =
[0.5, 1, 2]; Gaussian ``x ~ N(L F^T, 1)`` and Poisson ``x ~ Poisson(softplus(L F^T))``.
For each replicate, spfa is fitted from its own initialisation with default
settings and ``n_components=3``, and compared with the peers fitted to the same
data: truncated SVD and FactorAnalysis (Gaussian); the per-feature mean (null
model) and NMF with KL loss (Poisson). The figure of merit is the relative error
``||M_hat - M||_F / ||M||_F`` of E[L F^T] (Gaussian) or of the fitted mean
(Poisson) against the truth. Finally the notebook's own code (4000 RMSprop
epochs, started at the truth as the notebook did) is timed on the Poisson
design next to spfa, in the same run.

Every spfa fit writes a TensorBoard run under ``<out>/tensorboard``:

    tensorboard --logdir runs/sanity/tensorboard

Usage::

    python simulations/sanity_checks.py [--seed 1] [--n-reps 3] [--out runs/sanity]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import NMF, FactorAnalysis, TruncatedSVD
from sklearn.exceptions import ConvergenceWarning

from spfa import SparseFactorAnalysis
from spfa.simulate import simulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebook import NotebookModel  # noqa: E402


def rel_error(estimate, truth):
    return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))


def peers(likelihood, x, truth):
    if likelihood == "gaussian":
        svd = TruncatedSVD(3, random_state=0).fit(x)
        fa = FactorAnalysis(3, random_state=0).fit(x)
        return {
            "truncated_svd": rel_error(svd.transform(x) @ svd.components_, truth),
            "factor_analysis": rel_error(fa.transform(x) @ fa.components_ + fa.mean_, truth),
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        nmf = NMF(
            3,
            beta_loss="kullback-leibler",
            solver="mu",
            init="nndsvda",
            max_iter=1000,
            random_state=0,
        )
        w = nmf.fit_transform(x)
    null = np.broadcast_to(x.mean(0), x.shape)
    return {"null_mean": rel_error(null, truth), "nmf_kl": rel_error(w @ nmf.components_, truth)}


def run_spfa(likelihood, sim, seed, log_dir):
    t0 = time.perf_counter()
    est = SparseFactorAnalysis(3, likelihood=likelihood, random_state=seed, log_dir=log_dir)
    est.fit(sim.x)
    seconds = time.perf_counter() - t0
    return est, seconds, rel_error(est.inverse_transform(est.loadings_), sim.mean)


def run_notebook(sim, seed, epochs):
    torch.manual_seed(seed)
    n, p = sim.x.shape
    model = NotebookModel(n, p, 3, poisson=True)
    init = (
        torch.tensor(sim.loadings, dtype=torch.float32),
        torch.tensor(sim.factors, dtype=torch.float32),
    )
    t0 = time.perf_counter()
    model.fit(
        torch.tensor(sim.x, dtype=torch.float32), torch.ones(n, 1), init=init, n_epochs=epochs
    )
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        eta = (model.l()[0] @ model.f()[0].T).numpy()
    eta_err = rel_error(eta, sim.loadings @ sim.factors.T)
    return seconds, rel_error(model.fitted_mean().numpy(), sim.mean), eta_err


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1, help="first replicate's seed")
    parser.add_argument("--n-reps", type=int, default=3, help="replicates per design")
    parser.add_argument("--out", default="runs/sanity", help="output folder")
    parser.add_argument(
        "--notebook-epochs",
        type=int,
        default=4000,
        help="epochs of the notebook's own code (0 skips it)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for likelihood in ("gaussian", "poisson"):
        print(f"\n== {likelihood} design (n=100, p=500, k=3) ==")
        print(f"{'seed':>5} {'spfa':>7} {'peers':<44} {'iters':>6} {'sec':>6}  pi_L / pi_F")
        for seed in range(args.seed, args.seed + args.n_reps):
            sim = simulate(likelihood, seed=seed)
            log_dir = out / "tensorboard" / f"{likelihood}-seed{seed}"
            est, seconds, err = run_spfa(likelihood, sim, seed, log_dir)
            peer = peers(likelihood, sim.x, sim.mean)
            peer_txt = " ".join(f"{k}={v:.3f}" for k, v in peer.items())
            print(
                f"{seed:>5} {err:7.3f} {peer_txt:<44} {est.n_iter_:>6} {seconds:6.2f}  "
                f"{np.round(est.loadings_prior_pi_, 2)} / {np.round(est.factors_prior_pi_, 2)}"
            )
            rows.append(
                dict(
                    likelihood=likelihood,
                    seed=seed,
                    spfa=err,
                    seconds=seconds,
                    n_iter=est.n_iter_,
                    **peer,
                )
            )

    print("\n== summary: mean relative error over replicates (lower is better) ==")
    summary = {}
    for likelihood in ("gaussian", "poisson"):
        rs = [r for r in rows if r["likelihood"] == likelihood]
        keys = [k for k in rs[0] if k not in ("likelihood", "seed", "seconds", "n_iter")]
        means = {k: float(np.mean([r[k] for r in rs])) for k in keys}
        best_peer = min(v for k, v in means.items() if k != "spfa")
        summary[likelihood] = dict(means, spfa_over_best_peer=means["spfa"] / best_peer)
        print(
            f"{likelihood:>9}: "
            + "  ".join(f"{k}={v:.3f}" for k, v in means.items())
            + f"  | spfa / best peer = {means['spfa'] / best_peer:.2f}"
        )

    if args.notebook_epochs > 0:
        sim = simulate("poisson", seed=args.seed)
        nb_sec, nb_err, nb_eta = run_notebook(sim, args.seed, args.notebook_epochs)
        est, sp_sec, sp_err = run_spfa("poisson", sim, args.seed, None)
        sp_eta = rel_error(
            est.loadings_ @ est.components_ + est.intercept_, sim.loadings @ sim.factors.T
        )
        summary["notebook_timing"] = dict(
            notebook_seconds=nb_sec,
            notebook_error=nb_err,
            notebook_eta_error=nb_eta,
            spfa_seconds=sp_sec,
            spfa_error=sp_err,
            spfa_eta_error=sp_eta,
            time_ratio=sp_sec / nb_sec,
        )
        print(f"\n== the notebook's own code, Poisson design, seed {args.seed} ==")
        print(
            f"notebook ({args.notebook_epochs} RMSprop epochs, started at the truth): "
            f"{nb_sec:.2f} s, relative error of the mean {nb_err:.3f}, of L F^T {nb_eta:.3f}"
        )
        print(
            f"spfa (own initialisation, defaults): {sp_sec:.2f} s, "
            f"relative error of the mean {sp_err:.3f}, of L F^T {sp_eta:.3f}"
        )
        print(f"time ratio spfa / notebook = {sp_sec / nb_sec:.2f}")

    (out / "results.json").write_text(json.dumps(dict(rows=rows, summary=summary), indent=2))
    print(f"\nwrote {out / 'results.json'} and TensorBoard runs in {out / 'tensorboard'}")
    return summary


if __name__ == "__main__":
    main()
