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

``--plan`` prints instead the arithmetic of a larger run that was not measured (the
default: 1M cells x 30k genes, k = 30, on 8 GPUs): the bytes all-reduced per step
(counted from the model's own shared parameters), the memory per rank (the CSR shard,
the rows' variational parameters and their optimiser state, and the step's
temporaries, whose number of ``batch x p`` arrays is measured here by running steps
of that shape on the CPU), and the time per epoch bound by the GPU's memory bandwidth
(about 20 passes over the batch's ``batch x p`` float32 values per step) and by the
all-reduces over the interconnect::

    python -m simulations.scale_out --plan [--plan-cells 1000000] [--plan-genes 30000]
        [--plan-k 30] [--plan-gpus 8] [--plan-batch 4096] [--plan-density 0.07]
        [--plan-hbm-gbs 3350] [--plan-link-gbs 300] [--plan-step-overhead-ms 3]
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

    from spfa.testing.distributed import leave_group_and_exit

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
        dist.barrier()  # no rank tears the group down while another still uses it
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_group_and_exit()


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


_STEP = """
import resource, sys, numpy as np, torch
from spfa import fitting
from spfa.likelihoods import get_likelihood
p, k, b = (int(a) for a in sys.argv[1:4])
lik = get_likelihood("poisson", "exp")
lik.initialize(np.ones(p), np.ones(p))
priors = {"loadings": "point_normal", "factors": "point_normal"}
settings = fitting.FitSettings(k, priors, True, "mc", 1, 8, 1, 0.0, 0.05, None, torch.device("cpu"))
x = torch.poisson(torch.ones(b, p))
model = fitting.new_model(b, p, lik, settings)
opt = torch.optim.Adam(model.parameters(), lr=0.01)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(3):
    opt.zero_grad()
    (-model.elbo_terms(x, None, None, settings.rule(), None).elbo).backward()
    opt.step()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
adam = 2 * sum(q.numel() for q in model.parameters()) * 4
print(((after - before) * 1024 - adam) / (4.0 * b * p))
"""


def _step_temporaries(p: int, k: int, batch: int) -> float:
    """The memory a training step of ``batch x p`` takes beyond the model and Adam's
    state, in ``batch x p`` float32 arrays: the peak RSS growth over steps of the
    default model on the CPU, in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", _STEP, str(p), str(k), str(batch)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def plan(args) -> dict:
    """The arithmetic of a data-parallel run at a size not measured (``--plan``)."""
    import torch

    from spfa import fitting
    from spfa.likelihoods import get_likelihood

    n, p, k, w, b = args.plan_cells, args.plan_genes, args.plan_k, args.plan_gpus, args.plan_batch
    lik = get_likelihood("poisson", "exp")
    lik.initialize(np.ones(p), np.ones(p))
    settings = fitting.FitSettings(
        k,
        {"loadings": "point_normal", "factors": "point_normal"},
        True,
        "mc",
        1,
        8,
        1,
        0.0,
        0.05,
        b,
        torch.device("cpu"),
    )
    model = fitting.new_model(1, p, lik, settings)
    rows = {id(q) for q in model.row_parameters()}
    shared = sum(q.numel() for q in model.parameters() if id(q) not in rows)
    per_row = sum(q.numel() for q in model.parameters() if id(q) in rows)  # one row's
    rows_per_rank = -(-n // w)
    steps = -(-rows_per_rank // b)
    nnz = rows_per_rank * p * args.plan_density
    arrays = _step_temporaries(min(p, 4000), k, min(b, 1024))
    gib = 2.0**30
    memory = {
        "csr_shard_gib": nnz * 8 / gib,  # float32 value + int32 column per stored entry
        "rows_q_and_adam_gib": rows_per_rank * per_row * 4 * 3 / gib,
        "shared_q_and_adam_gib": shared * 4 * 3 / gib,
        "step_temporaries_gib": arrays * b * p * 4 / gib,
    }
    allreduce_bytes = (shared + 1) * 4  # gradients, plus the window's terms (negligible)
    # ring all-reduce: each GPU sends and receives 2 (w - 1) / w of the buffer
    allreduce_s = 2 * (w - 1) / w * allreduce_bytes / (args.plan_link_gbs * 1e9)
    compute_s = 20 * b * p * 4 / (args.plan_hbm_gbs * 1e9)
    step_s = compute_s + allreduce_s + args.plan_step_overhead_ms / 1e3
    return {
        "cells": n,
        "genes": p,
        "k": k,
        "gpus": w,
        "batch": b,
        "density": args.plan_density,
        "shared_parameters": shared,
        "allreduce_bytes_per_step": allreduce_bytes,
        "rows_per_rank": rows_per_rank,
        "steps_per_epoch": steps,
        "step_temporaries_in_batch_x_p_arrays": arrays,
        **memory,
        "memory_per_rank_gib": sum(memory.values()),
        "compute_seconds_per_step": compute_s,
        "allreduce_seconds_per_step": allreduce_s,
        "seconds_per_epoch": steps * step_s,
    }


def _print_plan(row) -> None:
    print(
        f"{row['cells']:,} cells x {row['genes']:,} genes, k = {row['k']}, {row['gpus']} GPUs, "
        f"batch {row['batch']} rows per GPU, {row['density']:.0%} non-zero (arithmetic, not "
        "a measurement)"
    )
    print(
        f"shared parameters {row['shared_parameters']:,}: "
        f"{row['allreduce_bytes_per_step'] / 2**20:.1f} MiB all-reduced per step"
    )
    print(
        f"per rank: {row['rows_per_rank']:,} rows, {row['steps_per_epoch']} steps per epoch; "
        f"memory {row['memory_per_rank_gib']:.1f} GiB = CSR shard {row['csr_shard_gib']:.1f} + "
        f"rows' q(L) and Adam {row['rows_q_and_adam_gib']:.2f} + shared q and Adam "
        f"{row['shared_q_and_adam_gib']:.2f} + a step's temporaries "
        f"{row['step_temporaries_gib']:.1f} ({row['step_temporaries_in_batch_x_p_arrays']:.1f} "
        "batch x p float32 arrays, measured on the CPU)"
    )
    print(
        f"per step: {row['compute_seconds_per_step'] * 1e3:.2f} ms at the memory-bandwidth "
        f"bound + {row['allreduce_seconds_per_step'] * 1e3:.2f} ms all-reduce + the launch "
        f"overhead; per epoch {row['seconds_per_epoch']:.1f} s"
    )


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
    parser.add_argument("--plan", action="store_true", help="the arithmetic of a larger run")
    parser.add_argument("--plan-cells", type=int, default=1_000_000)
    parser.add_argument("--plan-genes", type=int, default=30_000)
    parser.add_argument("--plan-k", type=int, default=30)
    parser.add_argument("--plan-gpus", type=int, default=8)
    parser.add_argument("--plan-batch", type=int, default=4096)
    parser.add_argument("--plan-density", type=float, default=0.07)
    parser.add_argument("--plan-hbm-gbs", type=float, default=3350.0, help="GPU memory GB/s")
    parser.add_argument("--plan-link-gbs", type=float, default=300.0, help="all-reduce GB/s")
    parser.add_argument("--plan-step-overhead-ms", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.plan:
        row = plan(args)
        _print_plan(row)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "plan.json").write_text(json.dumps(row, indent=2))
        return 0
    if args.worker:
        worker(args)
        return 0
    table = run(args)
    _print(table)
    return 1 if table["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
