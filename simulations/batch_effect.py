"""A batch effect that a plain fit turns into factors and a covariate-aware fit does not.

Simulates Poisson counts with three batches (:func:`spfa.simulate.simulate_batch_effect`:
600 cells x 300 genes, 3 sparse factors, each gene shifted by ``N(0, 0.8^2)`` in each
batch) and fits spfa twice with the same settings (``n_components=6``): without the
batch, and with the one-hot batch as ``covariates``. Reported per replicate and on
average:

* the largest ``|correlation|`` of a kept factor's loadings with a batch indicator
  (the batch as a factor: large without covariates, small with them);
* the correlation of the fitted batch effects with the planted ones, as far as they
  are identified beside the intercept (each gene's effects less their mean over the
  batches);
* the relative error of the fitted mean against the truth, and the fit's seconds.

The figure (``--out``/batch_effect.png, copied to figures/ by ``--figure``) shows, for
the first replicate, the loadings of each fit's most batch-like factor by batch, and
the planted against the fitted batch effects.

    python -m simulations.batch_effect [--n-reps 5] [--out runs/batch_effect] [--figure]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
K = 6


def _batch_correlation(est, onehot) -> np.ndarray:
    """Each kept factor's largest |correlation| with a batch indicator."""
    Z = est.loadings_[:, est.active_components_]
    out = []
    for j in range(Z.shape[1]):
        if np.std(Z[:, j]) == 0:
            out.append(0.0)
            continue
        out.append(
            max(abs(np.corrcoef(Z[:, j], onehot[:, c])[0, 1]) for c in range(onehot.shape[1]))
        )
    return np.array(out)


def _contrasts(coef: np.ndarray) -> np.ndarray:
    return coef - coef.mean(1, keepdims=True)


def _fit(sim, covariates):
    from sklearn.exceptions import ConvergenceWarning

    from spfa import SparseFactorAnalysis

    est = SparseFactorAnalysis(K, random_state=0)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(sim.x, covariates=covariates)
    seconds = time.perf_counter() - t0
    mean = est.inverse_transform(est.loadings_, covariates=covariates)
    mean = mean * est.training_size_factors_[:, None]
    return est, seconds, float(np.linalg.norm(mean - sim.mean) / np.linalg.norm(sim.mean))


def run(n_reps: int, seed: int):
    from spfa.simulate import simulate_batch_effect

    rows, first = [], None
    for rep in range(n_reps):
        sim = simulate_batch_effect(seed=seed + rep)
        plain, t_plain, e_plain = _fit(sim, None)
        aware, t_aware, e_aware = _fit(sim, sim.covariates)
        r = np.corrcoef(
            _contrasts(sim.batch_coef).ravel(), _contrasts(aware.covariate_coef_).ravel()
        )
        row = {
            "seed": seed + rep,
            "plain_max_batch_corr": float(_batch_correlation(plain, sim.covariates).max()),
            "aware_max_batch_corr": float(_batch_correlation(aware, sim.covariates).max()),
            "plain_kept": int(plain.n_effective_components_),
            "aware_kept": int(aware.n_effective_components_),
            "batch_coef_corr": float(r[0, 1]),
            "plain_error": e_plain,
            "aware_error": e_aware,
            "plain_seconds": t_plain,
            "aware_seconds": t_aware,
        }
        rows.append(row)
        print(
            f"seed {row['seed']}: max |corr| with the batch {row['plain_max_batch_corr']:.2f} "
            f"without covariates ({row['plain_kept']} kept), {row['aware_max_batch_corr']:.2f} "
            f"with ({row['aware_kept']} kept); batch effects recovered "
            f"{row['batch_coef_corr']:.3f}; "
            f"error {row['plain_error']:.3f} / {row['aware_error']:.3f}; "
            f"{row['plain_seconds']:.1f} s / {row['aware_seconds']:.1f} s",
            flush=True,
        )
        if first is None:
            first = (sim, plain, aware)
    return rows, first


def plot(first, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim, plain, aware = first
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, est, title in (
        (axes[0], plain, "without covariates"),
        (axes[1], aware, "batch as covariates"),
    ):
        corr = _batch_correlation(est, sim.covariates)
        j = int(np.argmax(corr))
        z = est.loadings_[:, est.active_components_][:, j]
        groups = [z[sim.batch == b] for b in range(sim.covariates.shape[1])]
        ax.boxplot(groups, showfliers=False)
        rng = np.random.default_rng(0)
        for b, g in enumerate(groups):
            ax.plot(b + 1 + 0.08 * rng.standard_normal(g.size), g, ".", ms=2, alpha=0.4)
        ax.set(
            xlabel="batch",
            ylabel="loading",
            title=f"{title}:\nmost batch-like factor, |r| = {corr[j]:.2f}",
        )
        ax.set_xticks(range(1, len(groups) + 1), [str(b) for b in range(len(groups))])
    planted = _contrasts(sim.batch_coef).ravel()
    fitted = _contrasts(aware.covariate_coef_).ravel()
    axes[2].plot(planted, fitted, ".", ms=2, alpha=0.5)
    lim = np.abs(np.concatenate([planted, fitted])).max()
    axes[2].plot([-lim, lim], [-lim, lim], "k:", lw=1)
    r = np.corrcoef(planted, fitted)[0, 1]
    axes[2].set(
        xlabel="planted effect (gene x batch, less the gene's mean)",
        ylabel="fitted covariate_coef_",
        title=f"batch effects recovered (r = {r:.3f})",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/batch_effect")
    parser.add_argument("--figure", action="store_true", help="copy the figure to figures/")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, first = run(args.n_reps, args.seed)
    mean = {key: float(np.mean([r[key] for r in rows])) for key in rows[0] if key != "seed"}
    print(
        f"mean over {len(rows)} replicates: max |corr| with the batch "
        f"{mean['plain_max_batch_corr']:.2f} without covariates, "
        f"{mean['aware_max_batch_corr']:.2f} "
        f"with; batch effects recovered {mean['batch_coef_corr']:.3f} (worst "
        f"{min(r['batch_coef_corr'] for r in rows):.3f}); error {mean['plain_error']:.3f} / "
        f"{mean['aware_error']:.3f}; {mean['plain_seconds']:.1f} s / {mean['aware_seconds']:.1f} s"
    )
    (out / "batch_effect.json").write_text(json.dumps({"rows": rows, "mean": mean}, indent=1))
    plot(first, out / "batch_effect.png")
    if args.figure:
        shutil.copy(out / "batch_effect.png", ROOT / "figures" / "batch_effect.png")
    print(f"wrote {out / 'batch_effect.json'} and {out / 'batch_effect.png'}")
    return rows


if __name__ == "__main__":
    main()
