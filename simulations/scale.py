"""Scale: minibatch fits of large sparse count matrices, time and memory against n.

Simulates single-cell-like Poisson counts with size factors (k = 10, about 5 %
non-zero, built row-chunk by row-chunk as CSR: no dense n x p array) at each n,
then fits spfa with ``batch_size`` in a fresh process per size and reports

* seconds per pass over the data (mean of the passes after the first),
* total fit time and passes (``--max-iter`` caps the passes),
* peak resident memory of the fitting process (and peak GPU memory on CUDA),
  against the size of the dense float64 matrix,
* relative error of the fitted mean against the truth on 2,000 random rows.

``--peers glmpca mofa+`` fits the same matrices with GLM-PCA and MOFA+ (the
optional ``bench`` extra), each in its own process, at the sizes up to
``--peer-max-n``. Both need the dense matrix, which they are given (float64,
as their documentation asks); each run is capped at ``--peer-timeout`` seconds
and, through ``RLIMIT_DATA``, at ``--peer-memory-gib`` of heap, and a peer that
hits a cap is reported as such, not dropped.

    python -m simulations.scale [--ns 10000 30000 100000 200000] [--p 5000]
        [--batch-size 128] [--max-iter 10] [--device cpu] [--out runs/scale]
        [--peers glmpca mofa+] [--peer-max-n 30000]

A figure of time per pass, fit time and peak memory against n is written to
``--out``/scale.png; ``scripts/scale.sh`` runs both measurements of the README
and copies their figures to figures/.
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


def _rows_error(fitted_rows, sim, rows) -> float:
    truth = sim.mean(rows)
    return float(np.linalg.norm(fitted_rows - truth) / np.linalg.norm(truth))


def _common(sim, n, p, k) -> dict:
    return {
        "n": n,
        "p": p,
        "k": k,
        "nnz": int(sim.x.nnz),
        "density": sim.x.nnz / (n * p),
        "dense_float64_gib": n * p * 8 / 2**30,
        "csr_gib": (sim.x.data.nbytes + sim.x.indices.nbytes + sim.x.indptr.nbytes) / 2**30,
    }


def _error_rows(n):
    rng = np.random.default_rng(0)
    return np.sort(rng.choice(n, size=min(n, 2000), replace=False))


def one_peer(method, n, p, k, max_iter, seed) -> dict:
    """Fit a peer (GLM-PCA or MOFA+) to the dense matrix in this process."""
    from simulations.peers import PEERS, NotInstalled
    from spfa.simulate import simulate_sparse_counts

    sim = simulate_sparse_counts(n, p, k, seed=seed)
    x = sim.x.toarray()  # the peers take dense input only
    try:
        fit = PEERS[method](x, k, "poisson", sim.size_factors, seed, max_iter=max_iter)
    except NotInstalled as err:
        return dict(n=n, p=p, method=method, status=f"not installed ({err})")
    rows = _error_rows(n)
    return {
        **_common(sim, n, p, k),
        "method": method,
        "status": "ok",
        "note": fit.note,
        "fit_seconds": fit.seconds,
        "passes": float("nan"),
        "seconds_per_pass": float("nan"),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "error": _rows_error(fit.mean[rows], sim, rows),
    }


def one(n, p, k, batch_size, max_iter, device, seed) -> dict:
    """Simulate and fit one size with spfa in this process; return the measurements."""
    import torch
    from sklearn.exceptions import ConvergenceWarning

    from spfa import SparseFactorAnalysis
    from spfa.simulate import MATCHED_FIT, simulate_sparse_counts

    t0 = time.perf_counter()
    sim = simulate_sparse_counts(n, p, k, seed=seed)
    sim_seconds = time.perf_counter() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    est = SparseFactorAnalysis(
        k, batch_size=batch_size, max_iter=max_iter, random_state=0, device=device, **MATCHED_FIT
    )
    # time each window of the stopping rule (whole passes) through the monitor hook
    import spfa.fitting as fitting_module

    pass_ends = []
    monitor_cls = fitting_module.Monitor

    class TimedMonitor(monitor_cls):
        def __call__(self, first, terms):
            pass_ends.append((time.perf_counter(), len(terms)))
            super().__call__(first, terms)

    t0 = time.perf_counter()
    fitting_module.Monitor = TimedMonitor
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(sim.x, size_factors=sim.size_factors)
    finally:
        fitting_module.Monitor = monitor_cls
    fit_seconds = time.perf_counter() - t0
    # seconds per pass from the windows after the first (which includes the start-up)
    per_pass = [
        (t1 - t0_) / m for (t0_, _), (t1, m) in zip(pass_ends[:-1], pass_ends[1:], strict=True)
    ]
    rows = _error_rows(n)
    fitted = est.inverse_transform(est.loadings_[rows]) * sim.size_factors[rows, None]
    out = {
        **_common(sim, n, p, k),
        "method": "spfa",
        "status": "ok",
        "note": f"batch {batch_size}",
        "batch_size": batch_size,
        "device": str(est.device_),
        "simulate_seconds": sim_seconds,
        "fit_seconds": fit_seconds,
        "passes": est.n_iter_,
        "seconds_per_pass": float(np.mean(per_pass)) if per_pass else float("nan"),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_after_simulation_gib": rss_before,
        "error": _rows_error(fitted, sim, rows),
        "factors_kept": int(est.n_effective_components_),
    }
    if device == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    ours = [r for r in ok if r["method"] == "spfa"]
    methods = list(dict.fromkeys(r["method"] for r in ok))
    n = np.array([r["n"] for r in ours])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(n, [r["seconds_per_pass"] for r in ours], "o-", label="spfa")
    slope = ours[0]["seconds_per_pass"] / ours[0]["n"]
    axes[0].plot(n, slope * n, "k:", label="linear in n")
    axes[0].set(xlabel="cells n", ylabel="seconds per pass", title="spfa: time per pass")
    axes[0].legend()
    for method in methods:
        rs = [r for r in ok if r["method"] == method]
        nm = [r["n"] for r in rs]
        axes[1].plot(nm, [r["fit_seconds"] for r in rs], "o-", label=method)
        axes[2].plot(nm, [r["peak_rss_gib"] for r in rs], "o-", label=f"{method} peak RSS")
    axes[1].set(xlabel="cells n", ylabel="seconds", title="whole fit", xscale="log", yscale="log")
    axes[1].legend()
    axes[2].plot(n, [r["dense_float64_gib"] for r in ours], "s--", label="dense X (float64)")
    axes[2].plot(n, [r["csr_gib"] for r in ours], "^:", label="sparse X (CSR)")
    axes[2].set(xlabel="cells n", ylabel="GiB", title="memory", xscale="log", yscale="log")
    axes[2].legend(fontsize=8)
    p, k, b = ours[0]["p"], ours[0]["k"], ours[0]["batch_size"]
    converged = all(r["passes"] < r["max_iter"] for r in ours)
    passes = "run to convergence" if converged else f"{ours[0]['passes']} passes each"
    peers = "; peers on the dense matrix" if len(methods) > 1 else ""
    fig.suptitle(f"p = {p}, k = {k}; spfa batch {b} on {ours[0]['device']}, {passes}{peers}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run(cmd, timeout, memory_gib):
    """Run one measurement in a fresh process; a row, or the reason there is none."""

    def limit():  # the child's heap cap, so a peer fails with MemoryError, not the machine
        if memory_gib:
            cap = int(memory_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, preexec_fn=limit
        )
    except subprocess.TimeoutExpired:
        return None, f"did not finish in {timeout} s"
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if "MemoryError" in done.stderr or "Cannot allocate memory" in done.stderr:
            return None, f"out of memory (heap capped at {memory_gib} GiB): {tail[:120]}"
        return None, f"failed (exit {done.returncode}): {tail[:160]}"
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m simulations.scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--ns", type=int, nargs="+", default=[10_000, 30_000, 100_000, 200_000])
    parser.add_argument("--p", type=int, default=5000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-iter", type=int, default=10, help="spfa's passes at most")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="runs/scale")
    parser.add_argument("--peers", nargs="*", default=[], choices=["glmpca", "mofa+"])
    parser.add_argument("--peer-max-n", type=int, default=30_000, help="largest n for peers")
    parser.add_argument("--peer-max-iter", type=int, default=1000, help="peers' iteration cap")
    parser.add_argument("--peer-timeout", type=int, default=1800, help="seconds per peer fit")
    parser.add_argument("--peer-memory-gib", type=float, default=18.0, help="peers' heap cap")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        n = args.ns[0]
        if args.one == "spfa":
            row = one(n, args.p, args.k, args.batch_size, args.max_iter, args.device, args.seed)
        else:
            row = one_peer(args.one, n, args.p, args.k, args.peer_max_iter, args.seed)
        print(json.dumps(row))
        return row
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    header = (
        f"{'n':>7} {'method':<7} {'nnz':>11} {'s/pass':>7} {'passes':>6} {'fit s':>7} "
        f"{'peak RSS':>9} {'dense X':>8} {'error':>6}"
    )
    print(header)
    for n in args.ns:
        methods = ["spfa"] + (args.peers if n <= args.peer_max_n else [])
        for method in methods:
            cmd = [sys.executable, "-m", "simulations.scale", "--one", method]
            cmd += ["--ns", str(n), "--p", str(args.p)]
            cmd += ["--k", str(args.k), "--batch-size", str(args.batch_size)]
            cmd += ["--max-iter", str(args.max_iter), "--device", args.device]
            cmd += ["--seed", str(args.seed), "--peer-max-iter", str(args.peer_max_iter)]
            peer = method != "spfa"
            row, why = _run(
                cmd,
                args.peer_timeout if peer else None,
                args.peer_memory_gib if peer else None,
            )
            if row is None and not peer:
                raise RuntimeError(f"spfa at n={n}: {why}")
            row = row or dict(n=n, p=args.p, method=method, status=why)
            if row["status"] != "ok":
                rows.append(row)
                print(f"{n:>7} {method:<7} {row['status']}", flush=True)
                continue
            row["max_iter"] = args.max_iter if not peer else args.peer_max_iter
            rows.append(row)
            print(
                f"{n:>7} {method:<7} {row['nnz']:>11} {row['seconds_per_pass']:7.2f} "
                f"{row['passes']:>6} {row['fit_seconds']:7.1f} {row['peak_rss_gib']:7.2f}G "
                f"{row['dense_float64_gib']:6.2f}G {row['error']:6.3f} {row['note']}",
                flush=True,
            )
    (out / "scale.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "scale.png")
    print(f"wrote {out / 'scale.json'} and {out / 'scale.png'}")
    return rows


if __name__ == "__main__":
    main()
