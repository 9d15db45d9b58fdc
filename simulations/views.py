"""Two views of the same cells, with shared and view-specific factors, against MOFA+.

Simulates (:func:`spfa.simulate.simulate_views`) 400 cells with an RNA view (300
genes, ``Poisson(softplus(eta))``) and a protein view (50 features), with six
factors: two shared, two in the RNA only, two in the protein only. Two designs:

* ``gaussian_adt``: the protein view Gaussian (noise sd 1), as normalised protein
  levels are usually modelled;
* ``count_adt``: the protein view raw counts, ``Poisson(softplus(eta))`` too.

Both methods get the right likelihood per view and 10 factors: spfa
``likelihood={"rna": "poisson", "adt": ...}, link="softplus"`` (MOFA+'s Poisson rate,
which the simulation uses) with its defaults otherwise; MOFA+ (``mofapy2``, the views
as its views, spike-and-slab and ARD weights, its Gaussian view centred by us and the
means added back, as MOFA+ has no intercept). Reported per design, as the mean over
replicates:

* per view, the relative error of the fitted ``E[x]`` against the truth, and its
  ratio spfa / MOFA+;
* the factor-to-view activity: each true factor is matched to a fitted one by the
  |correlation| of their loadings (Hungarian), and the fitted factor's activity in
  each view (spfa: its share of the view's ``view_elbo_contribution_``; MOFA+: its
  share of the view's variance explained) scores the planted activity; AUROC over
  every (view, true factor) of every replicate;
* seconds per fit;
* spfa's error from a fit started at the planted ``L`` and ``F`` (its optimum near the
  truth: where it equals the default fit's, the default start is not what limits it);
* the Bayes oracle's error (:func:`oracle_mean`): the posterior mean of ``L`` given the
  true ``F``, intercepts and priors. In the Gaussian view no method that must learn
  ``F`` can expect to beat it, so it is the floor against which a ratio to MOFA+ is read.

The figure (``--out``/views.png, copied to figures/ by ``--figure``) shows the first
replicate's planted activity beside each method's scores, and the errors.

    python -m simulations.views [--n-reps 5] [--out runs/views] [--figure]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.special import expit

ROOT = Path(__file__).resolve().parents[1]
K = 10
ACTIVITY = ((1, 1, 1, 1, 0, 0), (1, 1, 0, 0, 1, 1))
DESIGNS = {
    "gaussian_adt": (("rna", "poisson", 300), ("adt", "gaussian", 50)),
    "count_adt": (("rna", "poisson", 300), ("adt", "poisson", 50)),
}


def _errors(mean, sim) -> dict:
    out = {}
    for view in np.unique(sim.feature_groups):
        at = sim.feature_groups == view
        out[str(view)] = float(
            np.linalg.norm(mean[:, at] - sim.mean[:, at]) / np.linalg.norm(sim.mean[:, at])
        )
    return out


def _shares(score: np.ndarray) -> np.ndarray:
    """Each factor's share of each view's total (negative contributions count as 0)."""
    score = np.maximum(score, 0.0)
    return score / np.maximum(score.sum(1, keepdims=True), 1e-300)


def _activity(sim, loadings, shares) -> tuple[np.ndarray, float]:
    """The fitted factors' view shares at the true factors (matched by loadings), and the
    worst matched |correlation|."""
    from scipy.optimize import linear_sum_assignment

    k = sim.loadings.shape[1]
    corr = np.abs(np.corrcoef(sim.loadings.T, loadings.T)[:k, k:])
    rows, cols = linear_sum_assignment(-np.nan_to_num(corr))
    match = cols[np.argsort(rows)]
    return shares[:, match], float(corr[rows, cols].min())


def fit_spfa(sim, design, planted=False):
    import torch
    from sklearn.exceptions import ConvergenceWarning

    from spfa import SparseFactorAnalysis

    likelihood = {name: lik for name, lik, _ in design}
    k = sim.loadings.shape[1] if planted else K
    est = SparseFactorAnalysis(k, likelihood=likelihood, link="softplus", random_state=0)
    start = {"init_loadings": sim.loadings, "init_factors": sim.factors} if planted else {}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(sim.x, feature_groups=sim.feature_groups, **start)
    seconds = time.perf_counter() - t0
    log_s = torch.log(torch.as_tensor(est.training_size_factors_, dtype=torch.float32))
    with torch.no_grad():
        mean = est.get_model().fitted_mean(log_s).cpu().numpy()
    kept = est.active_components_
    shares = _shares(est.view_elbo_contribution_[:, kept])
    order = [list(est.view_names_).index(name) for name, _, _ in design]
    return mean, est.loadings_[:, kept], shares[order], seconds


def fit_mofa(sim, design, seed=0):
    from mofapy2.run.entry_point import entry_point

    names = [name for name, _, _ in design]
    liks = [lik for _, lik, _ in design]
    blocks, centres = [], []
    for name, lik in zip(names, liks, strict=True):
        x = sim.x[:, sim.feature_groups == name]
        centre = x.mean(0) if lik == "gaussian" else np.zeros(x.shape[1])
        blocks.append([x - centre])
        centres.append(centre)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ent = entry_point()
        ent.set_data_options(scale_views=False, center_groups=False)
        ent.set_data_matrix(blocks, likelihoods=liks, views_names=names)
        ent.set_model_options(factors=K, spikeslab_weights=True, ard_weights=True)
        ent.set_train_options(
            iter=1000, convergence_mode="fast", seed=seed, quiet=True, verbose=False
        )
        ent.build()
        ent.run()
        r2 = np.asarray(ent.model.calculate_variance_explained()[0])  # (views, factors)
    seconds = time.perf_counter() - t0
    nodes = ent.model.getNodes()
    z = nodes["Z"].getExpectation()
    weights = nodes["W"].getExpectation()
    mean = np.empty_like(sim.x)
    for name, lik, w, centre in zip(names, liks, weights, centres, strict=True):
        eta = z @ w.T
        at = sim.feature_groups == name
        mean[:, at] = eta + centre if lik == "gaussian" else np.logaddexp(0.0, eta)
    return mean, z, _shares(r2), seconds


def oracle_mean(sim, design, pi0=0.3, noise_sd=1.0) -> np.ndarray:
    """The Bayes oracle's ``E[x]``, shape (n, p): the posterior mean of ``L`` given the
    true ``F``, intercepts and priors (those of :func:`spfa.simulate.simulate_views`,
    slab sd 1), plugged in as the methods' means are.

    Each row's posterior is a mixture over the ``2^k`` spike patterns of ``L_i``. Within
    a pattern the log posterior is concave (Gaussian and softplus-Poisson terms are), so
    damped Newton steps find its mode, and a Laplace approximation there gives the
    pattern's mean and evidence (exact where every view is Gaussian). In a Gaussian view
    the oracle's ``E[L] F^T + b`` is the posterior mean of ``E[x]`` given ``F``: no
    estimator that must also learn ``F`` can expect a smaller squared error.
    """
    import itertools

    likelihood = {view: lik for view, lik, _ in design}
    poisson = np.array([likelihood[g] == "poisson" for g in sim.feature_groups])
    x, f, b = sim.x, sim.factors, sim.intercept
    n, k = sim.loadings.shape

    def log_lik(eta, x, poisson):  # (n, p')
        mu = np.logaddexp(0.0, eta)
        return np.where(poisson, x * np.log(mu) - mu, -0.5 * (x - eta) ** 2 / noise_sd**2)

    def curvature(eta, x, poisson, expected):  # -d2/deta2 log p (expected: Fisher's)
        mu, s = np.logaddexp(0.0, eta), expit(eta)
        if expected:
            w = s**2 / mu
        else:
            w = x * s**2 / mu**2 - s * (1 - s) * (x / mu - 1)
        return np.where(poisson, w, 1.0 / noise_sd**2)

    at_intercept = log_lik(np.broadcast_to(b, x.shape), x, poisson)  # every L_ij = 0
    log_w, means = [], []
    for pattern in itertools.product((0, 1), repeat=k):
        on = np.flatnonzero(pattern)
        log_prior = len(on) * np.log1p(-pi0) + (k - len(on)) * np.log(pi0)
        # the features the pattern's factors do not touch stay at their intercepts
        used = np.any(f[:, on] != 0, axis=1)
        log_prior = log_prior + at_intercept[:, ~used].sum(1)
        g, xu, bu, pu = f[used][:, on], x[:, used], b[used], poisson[used]
        z = np.zeros((n, len(on)))  # the pattern's non-zero loadings, row by row

        def objective(z, g=g, xu=xu, bu=bu, pu=pu):
            return log_lik(z @ g.T + bu, xu, pu).sum(1) - 0.5 * (z**2).sum(1)

        obj = objective(z)
        for _ in range(100 if len(on) else 0):
            eta = z @ g.T + bu
            mu, s = np.logaddexp(0.0, eta), expit(eta)
            score = np.where(pu, (xu / mu - 1) * s, (xu - eta) / noise_sd**2)
            fisher = curvature(eta, xu, pu, expected=True)
            hess = (g.T[None] * fisher[:, None, :]) @ g + np.eye(len(on))
            step = np.linalg.solve(hess, (score @ g - z)[..., None])[..., 0]
            for _ in range(30):  # halve the steps of the rows whose objective falls
                new = objective(z + step)
                worse = new < obj - 1e-9 * np.abs(obj)  # beyond rounding
                if not worse.any():
                    break
                step[worse] /= 2
            z, obj = np.where(worse[:, None], z, z + step), np.where(worse, obj, new)
            if np.abs(step).max() < 1e-7:
                break
        eta = z @ g.T + bu
        hess = (g.T[None] * curvature(eta, xu, pu, expected=False)[:, None, :]) @ g
        log_w.append(log_prior + obj - 0.5 * np.linalg.slogdet(hess + np.eye(len(on)))[1])
        mean = np.zeros((n, k))
        mean[:, on] = z
        means.append(mean)
    log_w = np.asarray(log_w)
    w = np.exp(log_w - log_w.max(0))
    loadings = np.einsum("cn,cnk->nk", w / w.sum(0), np.asarray(means))
    eta = loadings @ f.T + b
    return np.where(poisson, np.logaddexp(0.0, eta), eta)


def run(n_reps: int, seed: int):
    from sklearn.metrics import roc_auc_score

    from spfa.simulate import simulate_views

    results, first = {}, {}
    for design_name, design in DESIGNS.items():
        rows = []
        labels, scores = [], {"spfa": [], "mofa+": []}
        for rep in range(n_reps):
            sim = simulate_views(views=design, activity=ACTIVITY, seed=seed + rep)
            row = {"seed": seed + rep}
            for method, fit in (("spfa", fit_spfa), ("mofa+", fit_mofa)):
                mean, loadings, shares, seconds = fit(sim, design)
                matched, worst = _activity(sim, loadings, shares)
                scores[method].append(matched.ravel())
                row[method] = {
                    "error": _errors(mean, sim),
                    "seconds": seconds,
                    "worst_match": worst,
                    "shares": matched.tolist(),
                }
            # spfa's optimum near the truth: a fit started from the planted L and F
            row["spfa_planted_start"] = {
                "error": _errors(fit_spfa(sim, design, planted=True)[0], sim)
            }
            row["oracle"] = {"error": _errors(oracle_mean(sim, design), sim)}
            labels.append(sim.activity.ravel())
            rows.append(row)
            e_s, e_m = row["spfa"]["error"], row["mofa+"]["error"]
            e_p, e_o = row["spfa_planted_start"]["error"], row["oracle"]["error"]
            print(
                f"{design_name} seed {row['seed']}: error rna {e_s['rna']:.3f} / "
                f"{e_m['rna']:.3f} / {e_p['rna']:.3f} / {e_o['rna']:.3f}, adt "
                f"{e_s['adt']:.3f} / {e_m['adt']:.3f} / {e_p['adt']:.3f} / {e_o['adt']:.3f} "
                "(spfa / MOFA+ / spfa from the planted L and F / the oracle given F); "
                f"{row['spfa']['seconds']:.1f} s / {row['mofa+']['seconds']:.1f} s",
                flush=True,
            )
            if design_name not in first:
                first[design_name] = row
        y = np.concatenate(labels)
        summary = {
            "auroc": {m: float(roc_auc_score(y, np.concatenate(s))) for m, s in scores.items()}
        }
        for method in ("spfa", "mofa+", "spfa_planted_start", "oracle"):
            for view in ("rna", "adt"):
                summary[f"{method}_{view}_error"] = float(
                    np.mean([r[method]["error"][view] for r in rows])
                )
        for method in ("spfa", "mofa+"):
            summary[f"{method}_seconds"] = float(np.mean([r[method]["seconds"] for r in rows]))
        for view in ("rna", "adt"):
            summary[f"{view}_ratio"] = (
                summary[f"spfa_{view}_error"] / summary[f"mofa+_{view}_error"]
            )
            summary[f"{view}_worst_ratio"] = float(
                max(r["spfa"]["error"][view] / r["mofa+"]["error"][view] for r in rows)
            )
        results[design_name] = {"rows": rows, "summary": summary}
    return results, first


def plot(results, first, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    designs = list(results)
    fig, axes = plt.subplots(len(designs), 4, figsize=(15, 3.4 * len(designs)), squeeze=False)
    for i, name in enumerate(designs):
        row = first[name]
        panels = (
            ("planted activity", np.asarray(ACTIVITY, float)),
            ("spfa: share of view_elbo_contribution_", np.asarray(row["spfa"]["shares"])),
            ("MOFA+: share of variance explained", np.asarray(row["mofa+"]["shares"])),
        )
        for ax, (title, values) in zip(axes[i, :3], panels, strict=True):
            ax.imshow(values, cmap="Greys", vmin=0, aspect="auto")
            ax.set_yticks([0, 1], ["rna", "adt"])
            ax.set_xticks(range(values.shape[1]), [str(t) for t in range(values.shape[1])])
            ax.set(xlabel="true factor", title=f"{name}\n{title}")
        s = results[name]["summary"]
        x = np.arange(2)
        for j, (method, label) in enumerate(
            (("spfa", "spfa"), ("mofa+", "MOFA+"), ("oracle", "Bayes oracle given F"))
        ):
            errors = [s[f"{method}_rna_error"], s[f"{method}_adt_error"]]
            axes[i, 3].bar(x + 0.27 * (j - 1), errors, 0.27, label=label)
        axes[i, 3].set_xticks(x, ["rna", "adt"])
        axes[i, 3].set(
            ylabel="relative error of E[x]",
            title=f"AUROC spfa {s['auroc']['spfa']:.2f}, MOFA+ {s['auroc']['mofa+']:.2f}",
        )
        axes[i, 3].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/views")
    parser.add_argument("--figure", action="store_true", help="copy the figure to figures/")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, first = run(args.n_reps, args.seed)
    print(
        "| design | view | error spfa | error MOFA+ | ratio (worst) | AUROC spfa / MOFA+ "
        "| error, spfa from the planted L, F | error, Bayes oracle given F |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, res in results.items():
        s = res["summary"]
        for view in ("rna", "adt"):
            print(
                f"| {name} | {view} | {s[f'spfa_{view}_error']:.3f} | "
                f"{s[f'mofa+_{view}_error']:.3f} | {s[f'{view}_ratio']:.2f} "
                f"({s[f'{view}_worst_ratio']:.2f}) | "
                f"{s['auroc']['spfa']:.2f} / {s['auroc']['mofa+']:.2f} | "
                f"{s[f'spfa_planted_start_{view}_error']:.3f} | "
                f"{s[f'oracle_{view}_error']:.3f} |"
            )
        print(
            f"{name}: seconds per fit spfa {s['spfa_seconds']:.1f}, MOFA+ {s['mofa+_seconds']:.1f}"
        )
    (out / "views.json").write_text(json.dumps(results, indent=1))
    plot(results, first, out / "views.png")
    if args.figure:
        shutil.copy(out / "views.png", ROOT / "figures" / "views.png")
    print(f"wrote {out / 'views.json'} and {out / 'views.png'}")
    return results


if __name__ == "__main__":
    main()
