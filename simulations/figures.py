"""Draw the figures in ``figures/`` from the outputs of the sanity checks and the benchmark.

Reads ``<sanity>/results.json``, ``<sanity>/pooled.npz``, ``<sanity>/example_*.npz``
(written by ``sanity_checks.py``) and ``<benchmark>/benchmark.csv`` (written by
``benchmark.py``; skipped if absent). ``bash scripts/figures.sh`` runs all three.

Usage::

    python -m simulations.figures [--sanity runs/sanity] [--benchmark runs/benchmark] \
        [--out figures]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from spfa.plotting import (  # noqa: E402
    plot_accuracy_vs_time,
    plot_calibration,
    plot_elbo_trace,
    plot_intervals,
    plot_support_curves,
    plot_truth_vs_estimate,
)

DPI = 90


def _save(fig, path):

    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    print(f"wrote {path}")


def truth_vs_estimate(example, design, out):
    k = example["true_loadings"].shape[1]
    fig, axes = plt.subplots(2, k, figsize=(2.6 * k, 5.0), layout="constrained")
    plot_truth_vs_estimate(
        axes[0], example["true_loadings"], example["loadings"], example["loadings_pip"], "L"
    )
    sc = plot_truth_vs_estimate(
        axes[1], example["true_factors"], example["factors"], example["factors_pip"], "F"
    )
    fig.colorbar(sc, ax=axes, label="PIP", shrink=0.6)
    fig.suptitle(f"{design}: truth against posterior mean (first replicate)", fontsize=10)
    fig.savefig(out / f"truth_vs_estimate_{design}.png", dpi=DPI)
    plt.close(fig)
    print(f"wrote {out / f'truth_vs_estimate_{design}.png'}")


def intervals(example, design, level, out):
    """95 % intervals of L and F, one panel per true factor, for the first replicate."""
    k = example["true_loadings"].shape[1]
    fig, axes = plt.subplots(2, k, figsize=(3.0 * k, 5.0), layout="constrained", squeeze=False)
    for row, side in enumerate(("loadings", "factors")):
        for t in range(k):
            ax = axes[row, t]
            covered = plot_intervals(
                ax,
                example[f"gauged_true_{side}"][:, t],
                example[f"{side}_mean"][:, t],
                example[f"{side}_lower"][:, t],
                example[f"{side}_upper"][:, t],
            )
            ax.set_title(f"{side[0].upper()}, factor {t + 1}: {covered:.0%} covered", fontsize=8)
    fig.suptitle(
        f"{design}, first replicate: {level:.0%} credible intervals (bars; red: miss the truth),"
        "\nposterior mean (dots), truth in the fit's gauge (black ticks)",
        fontsize=9,
    )
    _save(fig, out / f"intervals_{design}.png")


def calibration(summary, n_reps, out):
    fig, ax = plt.subplots(figsize=(4.2, 4.0), layout="constrained")
    for design, entry in summary.items():
        if design in ("notebook_timing",) or "own" not in entry:
            continue
        plot_calibration(ax, entry["own"]["calibration"], label=design)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(
        f"PIP calibration, L and F pooled over {n_reps} replicates\n"
        "(grey band: ±0.1; hollow: bin < 50 entries)",
        fontsize=9,
    )
    _save(fig, out / "calibration.png")


def elbo_trace(example, design, out):
    history = {k[len("history_") :]: example[k] for k in example.files if k.startswith("history_")}
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2), layout="constrained")
    plot_elbo_trace(axes, history)
    fig.suptitle(f"{design}, first replicate: ELBO and its terms per step", fontsize=10)
    _save(fig, out / "elbo_trace.png")


def support_curves(pooled, designs, out):
    fig, axes = plt.subplots(
        1, len(designs), figsize=(3.3 * len(designs), 3.3), squeeze=False, layout="constrained"
    )
    for ax, design in zip(axes[0], designs, strict=True):

        def pooled_side(key, d=design):
            return np.concatenate([pooled[f"{d}__{key}_{s}"] for s in ("loadings", "factors")])

        truth = pooled_side("planted")
        plot_support_curves(
            ax,
            {
                "spfa PIP": (pooled_side("own"), truth),
                "spfa from truth": (pooled_side("truth"), truth),
                "|SVD/PCA|": (pooled_side("svd"), truth),
            },
        )
        ax.set_title(design, fontsize=9)
    fig.suptitle("support recovery of L and F (pooled over replicates)", fontsize=10)
    _save(fig, out / "support_recovery.png")


def peers(rows, out):
    designs = list(dict.fromkeys(r["design"] for r in rows))
    fig, axes = plt.subplots(
        1, len(designs), figsize=(3.4 * len(designs), 3.3), squeeze=False, layout="constrained"
    )
    for ax, design in zip(axes[0], designs, strict=True):
        plot_accuracy_vs_time(ax, [r for r in rows if r["design"] == design])
        ax.set_title(design, fontsize=9)
    fig.suptitle("relative error of the mean against wall time (mean over replicates)", fontsize=10)
    _save(fig, out / "peers.png")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m simulations.figures", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sanity", default="runs/sanity", help="sanity_checks.py output")
    parser.add_argument("--benchmark", default="runs/benchmark", help="benchmark.py output")
    parser.add_argument("--out", default="figures", help="where the PNGs go")
    args = parser.parse_args(argv)
    sanity, out = Path(args.sanity), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results = json.loads((sanity / "results.json").read_text())
    designs = results["args"]["designs"]
    for design in designs:
        path = sanity / f"example_{design}.npz"
        if design in ("gaussian", "poisson") and path.exists():
            truth_vs_estimate(np.load(path), design, out)
    example = sanity / "example_poisson.npz"
    if example.exists():
        elbo_trace(np.load(example), "poisson", out)
        if "gauged_true_loadings" in np.load(example).files:
            intervals(np.load(example), "poisson", results.get("level", 0.95), out)
    calibration(results["summary"], results["args"]["n_reps"], out)
    support_curves(np.load(sanity / "pooled.npz"), designs, out)

    bench = Path(args.benchmark) / "benchmark.csv"
    if bench.exists():
        with open(bench) as fh:
            peers(list(csv.DictReader(fh)), out)
    else:
        print(f"no {bench}: run python -m simulations.benchmark for the peer figure")


if __name__ == "__main__":
    main()
