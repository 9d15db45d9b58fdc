"""Real count matrices that ship inside packages on PyPI (no download at run time).

Each loader returns a :class:`RealCounts` ``(counts, genes, description)``:
``counts`` a ``scipy.sparse.csr_matrix`` of float64 integer counts (cells x
genes), ``genes`` the gene names, and ``description`` its provenance (package,
version, path inside the wheel, what was checked). The files are located with
``importlib.util.find_spec`` without importing the (heavy) package; a package
that is not installed raises :class:`DatasetUnavailable`. Both packages are in
the ``bench`` extra (``pip install -e .[bench]``).

* ``pbmc68k_reduced``: scanpy's ``scanpy/datasets/10x_pbmc68k_reduced.h5ad``,
  700 PBMCs (10x, from the 68k PBMC data of Zheng et al. 2017) x 765 genes.
  Its ``.X`` is scaled, but ``.raw.X`` holds ``log1p(counts / n_counts * 1e4)``
  rounded to 3 decimals, with ``n_counts`` the cell's total over all of its
  genes (``obs['n_counts']``). The counts are recovered as
  ``rint(expm1(raw.X) * n_counts / 1e4)``; the loader checks that the recovered
  values lie within 1e-3 (relative) of integers, that the integers reproduce
  the stored values (to the 3-decimal rounding) and that no neighbouring
  integer does, and refuses the file otherwise.
* ``celltypist_sample``: CellTypist's demo input
  ``celltypist/data/samples/sample_cell_by_gene.csv``, a UMI count matrix of
  559 cells x 32,786 gene symbols (10x), stored as integers in a CSV.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from spfa.io import abundant_features

#: stored log values of pbmc68k_reduced are rounded to this many decimals
_PBMC_DECIMALS = 3


class DatasetUnavailable(Exception):
    """The package that ships a data set is not installed (or lacks the file)."""


class RealCounts(NamedTuple):
    counts: sp.csr_matrix  # (cells, genes) float64 integer counts
    genes: np.ndarray  # (genes,) str
    description: str


def package_file(package: str, relpath: str) -> tuple[Path, str]:
    """Path of ``relpath`` inside the installed ``package`` (not imported) and its version."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable(f"package {package!r} is not installed (pip install {package})")
    for root in spec.submodule_search_locations:
        path = Path(root) / relpath
        if path.is_file():
            try:
                version = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                version = "unknown"
            return path, version
    raise DatasetUnavailable(f"{package} is installed but has no {relpath}")


def _strings(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def _csr_from_group(group) -> sp.csr_matrix:
    shape = group.attrs.get("h5sparse_shape", group.attrs.get("shape"))
    return sp.csr_matrix(
        (group["data"][:], group["indices"][:], group["indptr"][:]), shape=tuple(shape)
    )


def _column(group, name) -> np.ndarray:
    """A column of an AnnData dataframe: old (compound array) or new (group) layout."""
    import h5py

    if isinstance(group, h5py.Dataset):  # anndata < 0.7: one structured array
        return group[name]
    if name == "index":
        name = group.attrs["_index"]
    return group[name][:]


def load_pbmc68k_reduced() -> RealCounts:
    """700 PBMCs x 765 genes, counts recovered from scanpy's ``10x_pbmc68k_reduced``."""
    import h5py

    rel = "datasets/10x_pbmc68k_reduced.h5ad"
    path, version = package_file("scanpy", rel)
    with h5py.File(path, "r") as f:
        raw = _csr_from_group(f["raw.X"] if "raw.X" in f else f["raw/X"])
        n_counts = np.asarray(_column(f["obs"], "n_counts"), dtype=np.float64)
        var = f["raw.var"] if "raw.var" in f else f["raw/var"]
        genes = _strings(_column(var, "index"))
    stored = raw.data.astype(np.float64)
    rows = np.repeat(np.arange(raw.shape[0]), np.diff(raw.indptr))
    values = np.expm1(stored) * n_counts[rows] / 1e4
    counts = np.rint(values)
    rel_dev = float(np.max(np.abs(values - counts) / np.maximum(counts, 1.0)))
    if rel_dev > 1e-3 or counts.min() < 1:
        raise ValueError(
            f"{path}: expm1(raw.X) * n_counts / 1e4 is not integral "
            f"(max relative deviation {rel_dev:.2g}, smallest {counts.min():.3g})"
        )
    # the stored values are log1p(c / n * 1e4) rounded to 3 decimals: c must reproduce
    # them (up to float32 storage and ties) and c - 1, c + 1 must not
    tol = 0.5 * 10.0**-_PBMC_DECIMALS + 1e-6

    def reproduces(c):
        return np.abs(np.log1p(c * 1e4 / n_counts[rows]) - stored) <= tol

    if not reproduces(counts).all() or np.any(reproduces(counts - 1) | reproduces(counts + 1)):
        raise ValueError(f"{path}: the recovered counts do not reproduce raw.X uniquely")
    abs_dev = float(np.max(np.abs(values - counts)))
    x = sp.csr_matrix((counts, raw.indices.copy(), raw.indptr.copy()), shape=raw.shape)
    x.sum_duplicates()  # also sorts the column indices (the file's are not sorted)
    description = (
        f"scanpy {version}, scanpy/{rel}: 700 PBMCs (10x; Zheng et al. 2017) x "
        f"{x.shape[1]} genes; counts = rint(expm1(raw.X) * obs.n_counts / 1e4) "
        f"(raw.X stored to {_PBMC_DECIMALS} decimals: max deviation from an integer "
        f"{abs_dev:.3g}, relative {rel_dev:.2g}; every count reproduces raw.X uniquely)"
    )
    return RealCounts(x, genes, description)


def load_celltypist_sample() -> RealCounts:
    """559 cells x 32,786 genes: CellTypist's demo UMI count matrix (CSV, cells as rows)."""
    rel = "data/samples/sample_cell_by_gene.csv"
    path, version = package_file("celltypist", rel)
    with open(path, newline="") as fh:  # plain numbers after a header: faster than pandas here
        header = next(csv.reader([fh.readline()]))
        values = np.array(
            [line.rstrip("\r\n").split(",", 1)[1].split(",") for line in fh if line.strip()],
            dtype=np.float64,
        )
    genes = header[1:]
    if values.shape[1] != len(genes):
        raise ValueError(f"{path}: {values.shape[1]} values per row for {len(genes)} genes")
    counts = np.rint(values)
    dev = float(np.max(np.abs(values - counts))) if values.size else 0.0
    if dev > 1e-6 or values.min() < 0:
        raise ValueError(f"{path}: not non-negative integer counts (max deviation {dev:.3g})")
    x = sp.csr_matrix(counts)
    description = (
        f"celltypist {version}, celltypist/{rel}: CellTypist's demo UMI count matrix, "
        f"{x.shape[0]} cells x {x.shape[1]} gene symbols (10x), integers in a CSV"
    )
    return RealCounts(x, _strings(genes), description)


#: name -> (package that ships it, loader)
DATASETS = {
    "pbmc68k_reduced": ("scanpy", load_pbmc68k_reduced),
    "celltypist_sample": ("celltypist", load_celltypist_sample),
}


def load(name: str) -> RealCounts:
    """Load a data set of :data:`DATASETS` by name."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name][1]()


def select_genes(x: sp.csr_matrix, n_genes: int) -> np.ndarray:
    """Indices (ascending) of the ``n_genes`` genes of largest total count, among
    the genes with any count; ties broken by the lower index
    (:func:`spfa.io.abundant_features`, the command line's ``--n-top-features``)."""
    return np.flatnonzero(abundant_features(x, n_genes))
