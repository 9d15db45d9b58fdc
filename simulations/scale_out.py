"""Scale out: a data-parallel fit over ``torch.distributed`` ranks against one process.

For each design (Poisson counts, full batch; Gaussian, minibatches) the same
simulated rows are fitted twice with the same parameters:

* in this process, all rows at once;
* by ``--nproc`` processes under ``python -m torch.distributed.run`` (gloo on
  CPU, nccl with ``--backend nccl`` on GPUs), each fitting a contiguous share
  of the rows as one model (:mod:`spfa.distributed`).

It reports, per design, the relative error of the fitted mean against the
planted truth for both fits (over every row), whether ``components_`` is
bit-identical on every rank, the largest difference of ``components_`` from the
single-process fit, the fit times and passes, and each process's peak resident
memory. It exits non-zero when a check fails: the ranks disagree, or the
data-parallel error is more than ``--tolerance`` above the single-process one.

    python -m simulations.scale_out [--nproc 2] [--n-rows 1200] [--n-features 300]
        [--out runs/scale_out]

The ranks' results are written to ``--out``/``<design>-rank<r>.npz``, the table
to ``--out``/scale_out.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

#: design name -> simulate() arguments and estimator settings
DESIGNS = {
    "poisson_full_batch": (
        dict(likelihood="poisson"),
        dict(likelihood="poisson", link="softplus", library_size=False),
    ),
    "gaussian_minibatch": (
        dict(likelihood="gaussian"),
        dict(likelihood="gaussian", batch_size=100),
    ),
}
K = 3
SEED = 0


def _simulate(design: str, n: int, p: int):
    from spfa.simulate import simulate

    return simulate(n=n, p=p, seed=2, **DESIGNS[design][0])


def _estimator(design: str, device="cpu"):
    from spfa import SparseFactorAnalysis

    return SparseFactorAnalysis(K, random_state=SEED, device=device, **DESIGNS[design][1])


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _fit(design, x, device="cpu"):
    from sklearn.exceptions import ConvergenceWarning

    est = _estimator(design, device)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(x)
    return est, time.perf_counter() - t0


def _mean(est) -> np.ndarray:
    """The fitted mean of the training rows (size factor 1 in these designs)."""
    return est.inverse_transform(est.loadings_)


def shares(n: int, size: int) -> list[np.ndarray]:
    """Each rank's rows: contiguous, nearly equal shares."""
    return np.array_split(np.arange(n), size)


def worker(args) -> None:
    """One rank, under ``torch.distributed.run``: fit its share, write what it got."""
    import torch
    import torch.distributed as dist

    dist.init_process_group(args.backend)
    rank, size = dist.get_rank(), dist.get_world_size()
    if args.backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    out = Path(args.out)
    try:
        for design in args.designs:
            sim = _simulate(design, args.n_rows, args.n_features)
            rows = shares(args.n_rows, size)[rank]
            device = "cuda" if args.backend == "nccl" else "cpu"
            est, seconds = _fit(design, sim.x[rows], device)
            comp = torch.as_tensor(est.components_, device=device)
            low, high = comp.clone(), comp.clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            np.savez(
                out / f"{design}-rank{rank}.npz",
                rows=rows,
                mean=_mean(est),
                components=est.components_,
                identical=bool(torch.equal(low, high)),
                seconds=seconds,
                n_iter=est.n_iter_,
                elbo=est.elbo_,
                kept=est.n_effective_components_,
                peak_rss_mib=_peak_rss_mib(),
            )
    finally:
        dist.destroy_process_group()


def run(args) -> dict:
    from spfa.evaluation import relative_error

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "-m",
        "simulations.scale_out",
        "--worker",
        f"--n-rows={args.n_rows}",
        f"--n-features={args.n_features}",
        f"--out={out}",
        f"--backend={args.backend}",
        "--designs",
        *args.designs,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, timeout=args.timeout)
    parallel_wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the data-parallel run exited {proc.returncode}: {' '.join(cmd)}")

    import torch

    torch.set_num_threads(args.threads)
    table = {
        "nproc": args.nproc,
        "n": args.n_rows,
        "p": args.n_features,
        "k": K,
        "wall_seconds": parallel_wall,
    }
    failed = []
    for design in args.designs:
        sim = _simulate(design, args.n_rows, args.n_features)
        single, seconds = _fit(design, sim.x)
        ranks = [dict(np.load(out / f"{design}-rank{r}.npz")) for r in range(args.nproc)]
        mean = np.empty_like(sim.mean)
        for r in ranks:
            mean[r["rows"]] = r["mean"]
        row = {
            "single_error": relative_error(_mean(single), sim.mean),
            "parallel_error": relative_error(mean, sim.mean),
            "identical_on_ranks": all(bool(r["identical"]) for r in ranks)
            and all(np.array_equal(r["components"], ranks[0]["components"]) for r in ranks),
            "single_seconds": seconds,
            "parallel_seconds": max(float(r["seconds"]) for r in ranks),
            "single_passes": int(single.n_iter_),
            "parallel_passes": int(ranks[0]["n_iter"]),
            "single_kept": int(single.n_effective_components_),
            "parallel_kept": int(ranks[0]["kept"]),
            "single_elbo": float(single.elbo_),
            "parallel_elbo": float(ranks[0]["elbo"]),
            "peak_rss_mib_per_rank": [float(r["peak_rss_mib"]) for r in ranks],
        }
        row["error_gap"] = row["parallel_error"] - row["single_error"]
        table[design] = row
        if not row["identical_on_ranks"]:
            failed.append(f"{design}: components_ differ between ranks")
        if row["error_gap"] > args.tolerance:
            failed.append(
                f"{design}: data-parallel error {row['parallel_error']:.4f} is more than "
                f"{args.tolerance} above the single process's {row['single_error']:.4f}"
            )
    table["failed"] = failed
    (out / "scale_out.json").write_text(json.dumps(table, indent=2))
    return table


def _print(table) -> None:
    print(f"{table['nproc']} ranks, n={table['n']}, p={table['p']}, k={table['k']}")
    head = (
        f"{'design':<20} {'error 1 proc':>12} {'error ranks':>11} {'gap':>7} {'same':>5} "
        f"{'s 1 proc':>8} {'s ranks':>7} {'passes':>9} {'kept':>5} {'MiB/rank':>9}"
    )
    print(head)
    for design, row in table.items():
        if not isinstance(row, dict):
            continue
        print(
            f"{design:<20} {row['single_error']:12.4f} {row['parallel_error']:11.4f} "
            f"{row['error_gap']:+7.4f} {str(row['identical_on_ranks']):>5} "
            f"{row['single_seconds']:8.2f} {row['parallel_seconds']:7.2f} "
            f"{row['single_passes']:>4}/{row['parallel_passes']:<4} "
            f"{row['single_kept']}/{row['parallel_kept']:<3} "
            f"{max(row['peak_rss_mib_per_rank']):9.0f}"
        )
    for msg in table["failed"]:
        print("FAILED:", msg)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--n-rows", type=int, default=1200)
    parser.add_argument("--n-features", type=int, default=300)
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default="runs/scale_out")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    table = run(args)
    _print(table)
    return 1 if table["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
