"""A backed ``.h5ad`` larger than the fit's memory budget, fitted from disk.

Writes simulated Poisson counts (``x ~ Poisson(s softplus(L F^T + b))``, k = 10,
about half the entries non-zero at the default baseline) row block by row block
straight into an ``.h5ad`` (AnnData's CSR encoding, written with h5py: the
matrix is never in memory), then fits it in a fresh process that opens it with
``anndata.read_h5ad(path, backed="r")`` under a heap cap (``RLIMIT_DATA``,
``--budget-gib``) below the file's size, with ``batch_size``: every step reads
one batch of rows from disk (:mod:`spfa.backed`).

Reported: the file's size, the cap, the fitting process's peak resident memory
(and its resident memory after importing torch, spfa and anndata, before
opening the file), the fit's time and passes, and the relative error of the
fitted mean against the truth on 2,000 random rows. As a control, the same fit
of the file read into memory (``anndata.read_h5ad(path)``) is tried under the
same cap.

    python -m simulations.larger_than_memory [--n-rows 270000] [--n-features 2000]
        [--budget-gib 1.5] [--batch-size 256] [--max-iter 3] [--out runs/larger_than_memory]

The file is deleted afterwards unless ``--keep``.
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
K = 10
CHUNK = 4096


def _truth(n, p, seed, baseline):
    from spfa.simulate import simulate_point_normal

    rng = np.random.default_rng(seed)
    loadings = simulate_point_normal(rng, n, [0.8] * K, [1.0] * K)
    factors = simulate_point_normal(rng, p, [0.8] * K, [1.0] * K)
    intercept = rng.normal(baseline, 0.5, size=p)
    size_factors = np.exp(rng.normal(scale=0.5, size=n))
    return rng, loadings, factors, intercept, size_factors


def _mean(loadings, factors, intercept, size_factors, rows):
    eta = loadings[rows] @ factors.T + intercept
    return np.logaddexp(0.0, eta) * size_factors[rows, None]


def write(path: Path, n: int, p: int, seed: int, baseline: float) -> dict:
    """Write the counts to ``path`` block by block; the truth goes to ``path``.npz."""
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import write_elem

    rng, loadings, factors, intercept, s = _truth(n, p, seed, baseline)
    np.savez(
        path.with_suffix(".truth.npz"),
        loadings=loadings,
        factors=factors,
        intercept=intercept,
        size_factors=s,
    )
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        write_elem(f, "obs", pd.DataFrame({"size_factor": s}, index=[f"c{i}" for i in range(n)]))
        write_elem(f, "var", pd.DataFrame(index=[f"g{j}" for j in range(p)]))
        for key in ("obsm", "varm", "layers", "uns", "obsp", "varp"):
            write_elem(f, key, {})
        g = f.create_group("X")
        g.attrs["encoding-type"], g.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        g.attrs["shape"] = np.array([n, p])
        data = g.create_dataset("data", (0,), maxshape=(None,), dtype="f4", chunks=(2**18,))
        indices = g.create_dataset("indices", (0,), maxshape=(None,), dtype="i4", chunks=(2**18,))
        indptr = np.zeros(n + 1, dtype=np.int64)
        nnz = 0
        for a in range(0, n, CHUNK):
            rows = np.arange(a, min(a + CHUNK, n))
            block = sp.csr_matrix(
                rng.poisson(_mean(loadings, factors, intercept, s, rows)).astype(np.float32)
            )
            data.resize((nnz + block.nnz,))
            indices.resize((nnz + block.nnz,))
            data[nnz:], indices[nnz:] = block.data, block.indices
            indptr[a + 1 : rows[-1] + 2] = nnz + block.indptr[1:]
            nnz += block.nnz
        g["indptr"] = indptr
    return {"nnz": nnz, "write_seconds": time.perf_counter() - t0}


def fit(path: Path, batch_size: int, max_iter: int, in_memory: bool = False) -> dict:
    """Open the file backed (or read it, ``in_memory``) and fit it in this process; the
    measurements."""
    import anndata
    from sklearn.exceptions import ConvergenceWarning

    from spfa import SparseFactorAnalysis
    from spfa.simulate import MATCHED_FIT

    rss_imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    adata = anndata.read_h5ad(path, backed=None if in_memory else "r")
    truth = np.load(path.with_suffix(".truth.npz"))
    s = truth["size_factors"]
    est = SparseFactorAnalysis(
        K, batch_size=batch_size, max_iter=max_iter, random_state=0, **MATCHED_FIT
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # in memory: the estimator takes the matrix (an AnnData in memory goes through
        # spfa.anndata); backed: the AnnData itself, read by rows
        est.fit(adata.X if in_memory else adata, size_factors=s)
    seconds = time.perf_counter() - t0
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, 2000, replace=False))
    fitted = est.inverse_transform(est.loadings_[rows]) * s[rows, None]
    truth_mean = _mean(truth["loadings"], truth["factors"], truth["intercept"], s, rows)
    return {
        "fit_seconds": seconds,
        "passes": int(est.n_iter_),
        "factors_kept": int(est.n_effective_components_),
        "error": float(np.linalg.norm(fitted - truth_mean) / np.linalg.norm(truth_mean)),
        "rss_after_imports_gib": rss_imported,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-rows", type=int, default=270_000)
    parser.add_argument("--n-features", type=int, default=2000)
    parser.add_argument("--baseline", type=float, default=0.0, help="mean of the intercepts")
    parser.add_argument("--budget-gib", type=float, default=1.5, help="the fit's heap cap")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-iter", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="runs/larger_than_memory")
    parser.add_argument("--keep", action="store_true", help="keep the .h5ad")
    parser.add_argument("--fit", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fit is not None:  # the child: fit, print one JSON line
        print(json.dumps(fit(Path(args.fit), args.batch_size, args.max_iter, args.in_memory)))
        return {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "counts.h5ad"
    row = {"n": args.n_rows, "p": args.n_features, "k": K, "batch_size": args.batch_size}
    row.update(write(path, args.n_rows, args.n_features, args.seed, args.baseline))
    row["file_gib"] = path.stat().st_size / 2**30
    row["budget_gib"] = args.budget_gib
    row["dense_float32_gib"] = args.n_rows * args.n_features * 4 / 2**30

    def cap():
        limit = int(args.budget_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    cmd = [sys.executable, "-m", "simulations.larger_than_memory", "--fit", str(path)]
    cmd += ["--batch-size", str(args.batch_size), "--max-iter", str(args.max_iter)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, preexec_fn=cap)
    if done.returncode != 0:
        raise SystemExit(f"the fit failed under a {args.budget_gib} GiB heap cap:\n{done.stderr}")
    row.update(json.loads(done.stdout.strip().splitlines()[-1]))
    # the control: the same file read into memory, under the same cap
    t0 = time.perf_counter()
    control = subprocess.run(
        cmd + ["--in-memory"], capture_output=True, text=True, cwd=ROOT, preexec_fn=cap
    )
    if control.returncode == 0:
        peak = json.loads(control.stdout.strip().splitlines()[-1])["peak_rss_gib"]
        row["in_memory"] = f"fitted, peak RSS {peak:.2f} GiB"
    else:
        lines = control.stderr.strip().splitlines() or ["no output"]
        memory = [line for line in lines if "MemoryError" in line or "allocate" in line]
        why = (memory or lines)[-1].strip()
        row["in_memory"] = f"failed after {time.perf_counter() - t0:.0f} s: {why[:120]}"
    if not args.keep:
        path.unlink()
    (out / "larger_than_memory.json").write_text(json.dumps(row, indent=1))
    print(
        f"{row['n']:,} x {row['p']:,} counts, {row['nnz']:,} non-zeros: .h5ad of "
        f"{row['file_gib']:.2f} GiB (dense float32 {row['dense_float32_gib']:.2f} GiB), written "
        f"in {row['write_seconds']:.0f} s"
    )
    print(
        f"fit from disk under a {row['budget_gib']:.2f} GiB heap cap, batch {row['batch_size']}: "
        f"{row['fit_seconds']:.0f} s, {row['passes']} passes, peak RSS {row['peak_rss_gib']:.2f} "
        f"GiB ({row['rss_after_imports_gib']:.2f} GiB after the imports), error "
        f"{row['error']:.3f}, {row['factors_kept']} factors kept"
    )
    print(f"the same fit read into memory, under the same cap: {row['in_memory']}")
    return row


if __name__ == "__main__":
    main()
