"""Reproduce the seed notebook's sanity checks with spfa and measure what it recovers.

Designs (n=100, p=500, k=3, pi0 = [0.1, 0.9, 0.99] zero probabilities, slab sd =
[0.5, 1, 2]): the notebook's Gaussian ``x ~ N(L F^T, 1)`` and Poisson
``x ~ Poisson(softplus(L F^T))``, plus a negative binomial variant (r = 5) and
a Poisson variant with log-normal per-cell size factors. For each replicate,
spfa is fitted twice with ``n_components=3`` and default settings: from its own
initialisation, and from the truth (as the notebook did). Reported over
replicates:

- relative error ``||M_hat - M||_F / ||M||_F`` of E[L F^T] (Gaussian) or of the
  fitted mean (counts) against the truth;
- per-factor recovery after matching factors (``|cos|`` of the rank-one terms,
  and the correlation of matched columns, sign-invariant);
- support recovery of L and F from the PIPs (AUROC, average precision), pooled
  over replicates, next to ``|estimate|`` of a truncated SVD (Gaussian) / PCA
  of ``x / s`` (counts) of the same data;
- PIP calibration (PIPs binned, against the fraction truly non-zero);
- the learned prior per factor (inclusion probability ``1 - pi0`` and slab sd)
  against the truth; the wall time.

Every spfa fit writes a TensorBoard run under ``<out>/tensorboard``. The run
writes ``<out>/results.json``, ``<out>/pooled.npz`` (pooled PIPs and truth) and
``<out>/example_<design>.npz`` (the first replicate's estimates and ELBO trace),
which ``simulations/figures.py`` draws. Finally the notebook's own code (4000
RMSprop epochs, started at the truth) is timed next to spfa on the Poisson design.

Usage::

    python -m simulations.sanity_checks [--seed 1] [--n-reps 10] [--out runs/sanity]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from simulations.notebook import NotebookModel
from simulations.peers import fit_spfa, fit_svd
from spfa.evaluation import (
    calibration,
    match_factors,
    posterior_checks,
    relative_error,
    support_recovery,
    truth_in_estimate_gauge,
)
from spfa.priors import PointNormalPosterior
from spfa.simulate import SANITY_PI0, SANITY_SLAB_SD, simulate

#: design name -> simulate() arguments
DESIGNS = {
    "gaussian": dict(likelihood="gaussian"),
    "poisson": dict(likelihood="poisson"),
    "negative_binomial": dict(likelihood="negative_binomial", inverse_dispersion=5.0),
    "poisson_size_factors": dict(likelihood="poisson", size_factors="random"),
}
K = 3
#: credible level of the intervals checked for coverage
LEVEL = 0.95


def best_rank_svd_error(x: np.ndarray, truth: np.ndarray) -> tuple[float, int]:
    """Smallest relative error of a truncated SVD of ``x`` against ``truth`` over every
    rank (the SVD given the best rank in hindsight), and that rank."""
    u, sv, vt = np.linalg.svd(x, full_matrices=False)
    approx = np.zeros_like(truth)
    best, rank = np.inf, 0
    for r in range(len(sv)):
        approx += sv[r] * np.outer(u[:, r], vt[r])
        err = relative_error(approx, truth)
        if err < best:
            best, rank = err, r + 1
    return float(best), rank


def evaluate(fit, sim) -> tuple[dict, object]:
    """Figures of merit of one fit against the planted truth."""
    match = match_factors(fit.loadings, fit.factors, sim.loadings, sim.factors)
    out = {
        "error": relative_error(fit.mean, sim.mean),
        "seconds": fit.seconds,
        "similarity": match.similarity.tolist(),
        "loadings_corr": match.loadings_corr.tolist(),
        "factors_corr": match.factors_corr.tolist(),
    }
    for side, score, truth in (
        ("loadings", fit.loadings_score, sim.loadings),
        ("factors", fit.factors_score, sim.factors),
    ):
        sr = support_recovery(match.reorder(score), truth)
        out[f"{side}_auroc"] = sr["auroc"]
        out[f"{side}_ap"] = sr["average_precision"]
    est = fit.estimator
    if est is not None:
        for side in ("loadings", "factors"):
            out[f"{side}_prior_pi"] = match.reorder(getattr(est, f"{side}_prior_pi_")).tolist()
            out[f"{side}_prior_scale"] = match.reorder(
                getattr(est, f"{side}_prior_scale_")
            ).tolist()
        out["n_iter"] = int(est.n_iter_)
        out["active"] = match.reorder(est.active_components_).astype(float).tolist()
        out["n_effective"] = int(est.n_effective_components_)
        for side, post, truth in _gauged_posteriors(fit, sim, match):
            out[f"{side}_posterior"] = posterior_checks(post, truth, level=LEVEL)
            out[f"{side}_posterior_by_factor"] = [
                posterior_checks(
                    PointNormalPosterior(
                        post.pip[:, [e]], post.slab_mean[:, [e]], post.slab_sd[:, [e]]
                    ),
                    truth[:, [e]],
                    level=LEVEL,
                )
                for e in match.order
            ]
            # interval width against actual error on each true factor's non-zero entries
            out[f"{side}_sd_vs_error"] = [
                _sd_vs_error(post.sd[:, e], post.mean[:, e], truth[:, e]) for e in match.order
            ]
    return out, match


def _gauged_posteriors(fit, sim, match):
    """``(side, posterior, truth in the fit's gauge)`` for the loadings and the factors."""
    est = fit.estimator
    true_l, true_f = truth_in_estimate_gauge(
        match, fit.loadings, fit.factors, sim.loadings, sim.factors
    )
    return (
        ("loadings", est.loadings_posterior(), true_l),
        ("factors", est.factors_posterior(), true_f),
    )


def _sd_vs_error(sd, mean, truth) -> list[float]:
    """``[RMS posterior sd, RMS error]`` over the true non-zero entries (nan if none)."""
    nz = truth != 0
    if not nz.any():
        return [float("nan"), float("nan")]
    return [float(np.sqrt(np.mean(sd[nz] ** 2))), float(np.sqrt(np.mean((mean - truth)[nz] ** 2)))]


def _weighted(checks, key, weight) -> float:
    """Mean of ``key`` over ``checks`` weighted by ``weight`` (``nan`` if all weights are 0)."""
    w = np.array([c[weight] for c in checks], float)
    v = np.array([c[key] for c in checks], float)
    ok = w > 0
    return float(np.sum(v[ok] * w[ok]) / np.sum(w[ok])) if ok.any() else float("nan")


def _pool_posterior(rows) -> dict:
    """Interval coverage and lfsr sign accuracy pooled over replicates, per side and both."""
    out = {}
    for label, sides in (
        ("L", ("loadings",)),
        ("F", ("factors",)),
        ("all", ("loadings", "factors")),
    ):
        checks = [r[f"{side}_posterior"] for r in rows for side in sides]
        out[label] = {
            "coverage": _weighted(checks, "coverage", "n"),
            "coverage_nonzero": _weighted(checks, "coverage_nonzero", "n_nonzero"),
            "coverage_zero": _weighted(checks, "coverage_zero", "n_zero"),
            "sign_accuracy": _weighted(checks, "sign_accuracy", "n_confident"),
            "n_confident": int(sum(c["n_confident"] for c in checks)),
        }
    return out


def run_notebook(sim, seed, epochs):
    torch.manual_seed(seed)
    n, p = sim.x.shape
    model = NotebookModel(n, p, K, poisson=True)
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
    eta_err = relative_error(eta, sim.loadings @ sim.factors.T)
    return seconds, relative_error(model.fitted_mean().numpy(), sim.mean), eta_err


def _pool(pooled, key, value):
    pooled.setdefault(key, []).append(np.ravel(value))


def _summarise(rows, pooled, designs):
    summary = {}
    for design in designs:
        entry = {}
        for start in ("own", "truth", "svd"):
            rs = [r for r in rows if r["design"] == design and r["start"] == start]
            if not rs:
                continue
            entry[start] = {
                "error": float(np.mean([r["error"] for r in rs])),
                "seconds": float(np.mean([r["seconds"] for r in rs])),
                "similarity": np.mean([r["similarity"] for r in rs], axis=0).tolist(),
                "loadings_corr": np.mean([r["loadings_corr"] for r in rs], axis=0).tolist(),
                "factors_corr": np.mean([r["factors_corr"] for r in rs], axis=0).tolist(),
            }
            for side in ("loadings", "factors"):
                truth = np.concatenate(pooled[f"{design}/planted_{side}"])
                score = np.concatenate(pooled[f"{design}/{start}_{side}"])
                sr = support_recovery(score, truth)
                entry[start][f"{side}_auroc"] = sr["auroc"]
                entry[start][f"{side}_ap"] = sr["average_precision"]
                if start != "svd":
                    for what in ("prior_pi", "prior_scale"):
                        entry[start][f"{side}_{what}"] = np.mean(
                            [r[f"{side}_{what}"] for r in rs], axis=0
                        ).tolist()
            if start != "svd":
                truth = np.concatenate(
                    [
                        np.concatenate(pooled[f"{design}/planted_{s}"])
                        for s in ("loadings", "factors")
                    ]
                )
                pip = np.concatenate(
                    [
                        np.concatenate(pooled[f"{design}/{start}_{s}"])
                        for s in ("loadings", "factors")
                    ]
                )
                cal = calibration(pip, truth)
                entry[start]["calibration"] = cal.as_dict()
                entry[start]["calibration_max_gap"] = cal.max_gap(50)
                entry[start]["posterior"] = _pool_posterior(rs)
                entry[start]["active"] = np.mean([r["active"] for r in rs], axis=0).tolist()
                entry[start]["coverage_nonzero_by_factor"] = {
                    side[0].upper(): [
                        _weighted(
                            [r[f"{side}_posterior_by_factor"][t] for r in rs],
                            "coverage_nonzero",
                            "n_nonzero",
                        )
                        for t in range(K)
                    ]
                    for side in ("loadings", "factors")
                }
                with warnings.catch_warnings():  # a factor with no non-zero entries: nan
                    warnings.simplefilter("ignore", RuntimeWarning)
                    entry[start]["sd_vs_error"] = {
                        side[0].upper(): np.nanmean(
                            [r[f"{side}_sd_vs_error"] for r in rs], axis=0
                        ).tolist()
                        for side in ("loadings", "factors")
                    }
        summary[design] = entry
    return summary


def _print_summary(summary, n_reps):
    print(f"\n== summary over {n_reps} replicates (support: pooled over replicates) ==")
    head = (
        f"{'design':<21} {'start':<6} {'error':>6} {'AP(L)':>6} {'AP(F)':>6} "
        f"{'AUC(L)':>6} {'AUC(F)':>6} {'calib':>6} {'sec':>6}  |cos| per factor"
    )
    print(head)
    for design, entry in summary.items():
        for start, e in entry.items():
            err = f"{e['error']:.3f}"
            gap = e.get("calibration_max_gap", float("nan"))
            print(
                f"{design:<21} {start:<6} {err:>6} {e['loadings_ap']:6.3f} {e['factors_ap']:6.3f} "
                f"{e['loadings_auroc']:6.3f} {e['factors_auroc']:6.3f} {gap:6.3f} "
                f"{e['seconds']:6.2f}  {np.round(e['similarity'], 2)}"
            )
    print("(calib: largest |fraction non-zero - mean PIP| over PIP bins holding >= 50 entries)")
    print("\n== learned prior (mean over replicates, true-factor order) ==")
    print(f"true inclusion 1 - pi0 = {np.round(1 - np.array(SANITY_PI0), 2)}, ", end="")
    print(
        f"slab sd = {np.array(SANITY_SLAB_SD)} on both sides (product {np.square(SANITY_SLAB_SD)})"
    )
    for design, entry in summary.items():
        e = entry["own"]
        scale = np.multiply(e["loadings_prior_scale"], e["factors_prior_scale"])
        print(
            f"{design:<21} pi_L {np.round(e['loadings_prior_pi'], 2)} "
            f"pi_F {np.round(e['factors_prior_pi'], 2)} "
            f"sd_L*sd_F {np.round(scale, 2)}"
        )


def _print_posterior(summary):
    print(f"\n== {LEVEL:.0%} credible intervals and lfsr < 0.05 (own start, all replicates) ==")
    print(
        f"{'design':<21} {'side':<4} {'coverage':>8} {'non-zero':>8} {'zero':>6} "
        f"{'sign ok':>7} {'of':>5}"
    )
    for design, entry in summary.items():
        for side in ("L", "F", "all"):
            q = entry["own"]["posterior"][side]
            print(
                f"{design:<21} {side:<4} {q['coverage']:8.3f} {q['coverage_nonzero']:8.3f} "
                f"{q['coverage_zero']:6.3f} {q['sign_accuracy']:7.3f} {q['n_confident']:5d}"
            )
    print(
        "(coverage of the truth, in the fit's gauge, by equal-tailed intervals of the point-normal"
        "\n posterior, split by whether the true entry is non-zero; sign ok: share of the entries"
        "\n with lfsr < 0.05 whose sign is the true one, a true zero counting as wrong)"
    )
    print(
        "\n== factors kept after pruning (share of replicates) and coverage of the non-zero"
        "\n   entries of each true factor (true-factor order) =="
    )
    for design, entry in summary.items():
        e = entry["own"]
        by = e["coverage_nonzero_by_factor"]
        print(
            f"{design:<21} kept {np.round(e['active'], 2)}  "
            f"L {np.round(by['L'], 2)}  F {np.round(by['F'], 2)}"
        )
    print(
        "\n== RMS posterior sd / RMS error of the non-zero entries, per true factor"
        "\n   (mean over replicates; sd below error: intervals too narrow) =="
    )
    for design, entry in summary.items():
        parts = []
        for side in ("L", "F"):
            sd, err = np.array(entry["own"]["sd_vs_error"][side]).T
            parts.append(f"{side} {np.round(sd, 2)} / {np.round(err, 2)}")
        print(f"{design:<21} " + "   ".join(parts))


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m simulations.sanity_checks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seed", type=int, default=1, help="first replicate's seed")
    parser.add_argument("--n-reps", type=int, default=10, help="replicates per design")
    parser.add_argument("--out", default="runs/sanity", help="output folder")
    parser.add_argument(
        "--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS), help="designs to run"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="spfa's batch_size (minibatch training; default: full batch)",
    )
    parser.add_argument(
        "--notebook-epochs",
        type=int,
        default=4000,
        help="epochs of the notebook's own code (0 skips it)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows, pooled = [], {}
    for design in args.designs:
        spec = DESIGNS[design]
        lik = spec["likelihood"]
        print(f"\n== {design} (n=100, p=500, k=3) ==")
        print(f"{'seed':>5} {'start':<6} {'error':>6} {'AP(L)':>6} {'AP(F)':>6} {'sec':>6}  |cos|")
        for seed in range(args.seed, args.seed + args.n_reps):
            sim = simulate(seed=seed, **spec)
            _pool(pooled, f"{design}/planted_loadings", sim.loadings)
            _pool(pooled, f"{design}/planted_factors", sim.factors)
            fits = {
                "own": fit_spfa(
                    sim.x,
                    K,
                    lik,
                    sim.size_factors,
                    seed,
                    log_dir=out / "tensorboard" / f"{design}-seed{seed}",
                    batch_size=args.batch_size,
                ),
                "truth": fit_spfa(
                    sim.x,
                    K,
                    lik,
                    sim.size_factors,
                    seed,
                    init=(sim.loadings, sim.factors),
                    batch_size=args.batch_size,
                ),
                "svd": fit_svd(sim.x, K, lik, sim.size_factors, seed),
            }
            for start, fit in fits.items():
                metrics, match = evaluate(fit, sim)
                if lik == "gaussian" and start == "own":  # E[L F^T] against the best SVD
                    truth = sim.loadings @ sim.factors.T
                    metrics["lf_error"] = relative_error(fit.loadings @ fit.factors.T, truth)
                    metrics["svd_best_error"], metrics["svd_best_rank"] = best_rank_svd_error(
                        sim.x, truth
                    )
                _pool(pooled, f"{design}/{start}_loadings", match.reorder(fit.loadings_score))
                _pool(pooled, f"{design}/{start}_factors", match.reorder(fit.factors_score))
                rows.append(dict(design=design, seed=seed, start=start, **metrics))
                print(
                    f"{seed:>5} {start:<6} {metrics['error']:6.3f} {metrics['loadings_ap']:6.3f} "
                    f"{metrics['factors_ap']:6.3f} {fit.seconds:6.2f}  "
                    f"{np.round(metrics['similarity'], 2)}"
                )
                if start == "own" and seed == args.seed:
                    est = fit.estimator
                    intervals = {}
                    for side, post, truth in _gauged_posteriors(fit, sim, match):
                        lower, upper = post.interval(LEVEL)
                        # in true-factor order, in the fit's sign and scale
                        intervals[f"gauged_true_{side}"] = match.reorder(truth)
                        intervals[f"{side}_mean"] = match.reorder(post.mean)
                        intervals[f"{side}_lower"] = match.reorder(lower)
                        intervals[f"{side}_upper"] = match.reorder(upper)
                    np.savez_compressed(
                        out / f"example_{design}.npz",
                        true_loadings=sim.loadings,
                        true_factors=sim.factors,
                        loadings=match.align(fit.loadings),
                        factors=match.align(fit.factors),
                        loadings_pip=match.reorder(est.loadings_pip_),
                        factors_pip=match.reorder(est.factors_pip_),
                        **intervals,
                        **{f"history_{k}": np.asarray(est.history_[k]) for k in est.history_},
                    )

    gauss = [r for r in rows if "svd_best_error" in r]
    if gauss:
        ratio = np.array([r["lf_error"] / r["svd_best_error"] for r in gauss])
        print(
            "\n== Gaussian: relative error of E[L F^T] / that of the truncated SVD at its best "
            "rank ==\n"
            + " ".join(f"seed {r['seed']}: {x:.3f}" for r, x in zip(gauss, ratio, strict=True))
            + f"\nmean {ratio.mean():.3f} (spfa {np.mean([r['lf_error'] for r in gauss]):.3f}, "
            f"SVD {np.mean([r['svd_best_error'] for r in gauss]):.3f})"
        )
    summary = _summarise(rows, pooled, args.designs)
    _print_summary(summary, args.n_reps)
    _print_posterior(summary)

    if args.notebook_epochs > 0:
        sim = simulate("poisson", seed=args.seed)
        nb_sec, nb_err, nb_eta = run_notebook(sim, args.seed, args.notebook_epochs)
        fit = fit_spfa(sim.x, K, "poisson", None, args.seed)
        est = fit.estimator
        sp_eta = relative_error(
            est.loadings_ @ est.components_ + est.intercept_, sim.loadings @ sim.factors.T
        )
        sp_err = relative_error(fit.mean, sim.mean)
        summary["notebook_timing"] = dict(
            notebook_seconds=nb_sec,
            notebook_error=nb_err,
            notebook_eta_error=nb_eta,
            spfa_seconds=fit.seconds,
            spfa_error=sp_err,
            spfa_eta_error=sp_eta,
            time_ratio=fit.seconds / nb_sec,
        )
        print(f"\n== the notebook's own code, Poisson design, seed {args.seed} ==")
        print(
            f"notebook ({args.notebook_epochs} RMSprop epochs, started at the truth): "
            f"{nb_sec:.2f} s, relative error of the mean {nb_err:.3f}, of L F^T {nb_eta:.3f}"
        )
        print(
            f"spfa (own initialisation, defaults): {fit.seconds:.2f} s, "
            f"relative error of the mean {sp_err:.3f}, of L F^T {sp_eta:.3f}"
        )
        print(f"time ratio spfa / notebook = {fit.seconds / nb_sec:.2f}")

    np.savez_compressed(
        out / "pooled.npz", **{k.replace("/", "__"): np.concatenate(v) for k, v in pooled.items()}
    )
    (out / "results.json").write_text(
        json.dumps(dict(args=vars(args), level=LEVEL, rows=rows, summary=summary), indent=1)
    )
    print(f"\nwrote {out}/results.json, pooled.npz, example_*.npz, tensorboard/")
    return summary


if __name__ == "__main__":
    main()
