"""Scale: minibatch fits of large sparse count matrices, time and memory against n.

Simulates single-cell-like Poisson counts with size factors (k = 10, about 5 %
non-zero, built row-chunk by row-chunk as CSR: no dense n x p array) at each n,
then fits spfa with ``batch_size`` in a fresh process per size and reports

* seconds per pass over the data (mean of the passes after the first),
* total fit time and passes (``--max-iter`` caps the passes),
* peak resident memory of the fitting process (and peak GPU memory on CUDA),
  against the size of the dense float64 matrix,
* relative error of the fitted mean against the truth on 2,000 random rows.

    python simulations/scale.py [--ns 10000 30000 100000 200000] [--p 5000]
        [--batch-size 1024] [--max-iter 10] [--device cpu] [--out runs/scale]

A figure of time per pass and peak memory against n is written to
``--out``/scale.png (and copied to figures/ by scripts/figures.sh).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def one(n, p, k, batch_size, max_iter, device, seed) -> dict:
    """Simulate and fit one size in this process; return the measurements."""
    import torch
    from sklearn.exceptions import ConvergenceWarning

    from spfa import SparseFactorAnalysis
    from spfa.simulate import simulate_sparse_counts

    t0 = time.perf_counter()
    sim = simulate_sparse_counts(n, p, k, seed=seed)
    sim_seconds = time.perf_counter() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    est = SparseFactorAnalysis(
        k, batch_size=batch_size, max_iter=max_iter, random_state=0, device=device
    )
    # time each window of the stopping rule (whole passes) through the monitor hook
    import spfa.estimator as estimator_module

    pass_ends = []
    monitor_cls = estimator_module.Monitor

    class TimedMonitor(monitor_cls):
        def __call__(self, first, terms):
            pass_ends.append((time.perf_counter(), len(terms)))
            super().__call__(first, terms)

    t0 = time.perf_counter()
    estimator_module.Monitor = TimedMonitor
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(sim.x, size_factors=sim.size_factors)
    finally:
        estimator_module.Monitor = monitor_cls
    fit_seconds = time.perf_counter() - t0
    # seconds per pass from the windows after the first (which includes the start-up)
    per_pass = [
        (t1 - t0_) / m for (t0_, _), (t1, m) in zip(pass_ends[:-1], pass_ends[1:], strict=True)
    ]
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(n, size=min(n, 2000), replace=False))
    truth = sim.mean(rows)
    fitted = est.inverse_transform(est.loadings_[rows]) * sim.size_factors[rows, None]
    out = {
        "n": n,
        "p": p,
        "k": k,
        "nnz": int(sim.x.nnz),
        "density": sim.x.nnz / (n * p),
        "batch_size": batch_size,
        "device": str(est.device_),
        "simulate_seconds": sim_seconds,
        "fit_seconds": fit_seconds,
        "passes": est.n_iter_,
        "seconds_per_pass": float(np.mean(per_pass)) if per_pass else float("nan"),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_after_simulation_gib": rss_before,
        "dense_float64_gib": n * p * 8 / 2**30,
        "csr_gib": (sim.x.data.nbytes + sim.x.indices.nbytes + sim.x.indptr.nbytes) / 2**30,
        "error": float(np.linalg.norm(fitted - truth) / np.linalg.norm(truth)),
        "factors_kept": int(est.n_effective_components_),
    }
    if device == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.array([r["n"] for r in rows])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].plot(n, [r["seconds_per_pass"] for r in rows], "o-", label="spfa")
    slope = rows[0]["seconds_per_pass"] / rows[0]["n"]
    axes[0].plot(n, slope * n, "k:", label="linear in n")
    axes[0].set(xlabel="cells n", ylabel="seconds per pass", title="time per pass")
    axes[0].legend()
    axes[1].plot(n, [r["peak_rss_gib"] for r in rows], "o-", label="spfa peak RSS")
    axes[1].plot(n, [r["dense_float64_gib"] for r in rows], "s--", label="dense X (float64)")
    axes[1].plot(n, [r["csr_gib"] for r in rows], "^:", label="sparse X (CSR)")
    axes[1].set(xlabel="cells n", ylabel="GiB", title="memory", yscale="log")
    axes[1].legend()
    p, k, b = rows[0]["p"], rows[0]["k"], rows[0]["batch_size"]
    fig.suptitle(f"spfa minibatch fits: p = {p}, k = {k}, batch {b}, {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[10_000, 30_000, 100_000, 200_000])
    parser.add_argument("--p", type=int, default=5000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--max-iter", type=int, default=10, help="passes at most")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="runs/scale")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        row = one(
            args.ns[0], args.p, args.k, args.batch_size, args.max_iter, args.device, args.seed
        )
        print(json.dumps(row))
        return row
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    header = (
        f"{'n':>7} {'nnz':>11} {'s/pass':>7} {'passes':>6} {'fit s':>7} "
        f"{'peak RSS':>9} {'dense X':>8} {'error':>6}"
    )
    print(header)
    for n in args.ns:
        cmd = [sys.executable, __file__, "--one", "--ns", str(n), "--p", str(args.p)]
        cmd += ["--k", str(args.k), "--batch-size", str(args.batch_size)]
        cmd += ["--max-iter", str(args.max_iter), "--device", args.device, "--seed", str(args.seed)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{n:>7} {row['nnz']:>11} {row['seconds_per_pass']:7.2f} {row['passes']:>6} "
            f"{row['fit_seconds']:7.1f} {row['peak_rss_gib']:7.2f}G "
            f"{row['dense_float64_gib']:6.2f}G {row['error']:6.3f}",
            flush=True,
        )
    (out / "scale.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "scale.png")
    print(f"wrote {out / 'scale.json'} and {out / 'scale.png'}")
    return rows


if __name__ == "__main__":
    main()
