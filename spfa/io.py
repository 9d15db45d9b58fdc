"""Count matrices from files, as AnnData, and read in row blocks (needs ``anndata``).

:func:`read` takes what single-cell data come in:

* ``.h5ad`` (AnnData; ``backed=True`` opens it without loading ``X``);
* a 10x directory: ``matrix.mtx[.gz]`` (features x barcodes), ``features.tsv[.gz]``
  (or ``genes.tsv[.gz]``: id, symbol[, type]) and ``barcodes.tsv[.gz]``; gene
  symbols become ``var_names`` (made unique), ids ``var["gene_ids"]``;
* ``.npz``: a ``scipy.sparse`` matrix (cells x features) saved by
  :func:`scipy.sparse.save_npz`;
* ``.csv`` / ``.tsv`` (``.gz`` too): cells as rows, a header of feature names, each
  row's first field its cell name; an empty field is a missing entry (NaN).

Every problem with a file is a ``ValueError`` (or ``FileNotFoundError``) that names
the file and what is wrong with it.

:func:`read_rows` reads a matrix (in memory or backed) in blocks of rows, keeping
only some columns, so a backed file's ``X`` is never loaded whole.
"""

from __future__ import annotations

import contextlib
import gzip
import signal
import threading
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse as sp

__all__ = ["ROW_BLOCK_ENTRIES", "abundant_features", "iter_row_blocks", "read", "read_rows"]

#: entries (rows x columns) per block when a matrix is read in row blocks
ROW_BLOCK_ENTRIES = 2**24

_SUFFIXES = (".h5ad", ".npz", ".csv", ".tsv", ".csv.gz", ".tsv.gz")


def _anndata():
    try:
        import anndata
    except ImportError as err:
        raise ImportError(
            "reading and writing AnnData needs the anndata package: pip install 'spfa-vi[anndata]'"
        ) from err
    return anndata


def read(path, *, backed: bool | str = False):
    """Read a count matrix into an ``anndata.AnnData`` (cells x features).

    Parameters
    ----------
    path : str or path
        A ``.h5ad``, ``.npz``, ``.csv``/``.tsv`` file or a 10x directory.
    backed : bool or {"r", "r+"}, default=False
        Open a ``.h5ad`` without loading ``X``: read-only (True or ``"r"``) or to
        write other elements back into it (``"r+"``).

    Returns
    -------
    anndata.AnnData
    """
    ad = _anndata()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        return _read_10x(path, ad)
    name = path.name.lower()
    if name.endswith(".h5ad"):
        try:
            mode = "r" if backed is True else (backed or None)
            return ad.read_h5ad(path, backed=mode)
        except Exception as err:  # noqa: BLE001 - h5py, anndata and OS errors alike
            raise ValueError(f"{path} is not a readable .h5ad file ({_reason(err)})") from err
    if name.endswith(".npz"):
        try:
            X = sp.load_npz(path)
        except Exception as err:  # noqa: BLE001
            raise ValueError(
                f"{path} is not a scipy.sparse .npz file (scipy.sparse.save_npz) ({_reason(err)})"
            ) from err
        return ad.AnnData(X=sp.csr_matrix(X))
    if name.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
        return _read_table(path, ad, sep="\t" if ".tsv" in name else ",")
    raise ValueError(
        f"{path}: unknown input format; expected a 10x directory or a file ending in "
        + ", ".join(_SUFFIXES)
    )


def _reason(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


@contextlib.contextmanager
def _noting_interrupts():
    """Yields a list that a Ctrl-C inside appends to, still raising KeyboardInterrupt.

    pandas' C parser turns a KeyboardInterrupt raised while it reads into a
    ``ParserError`` ("Calling read(nbytes) on source failed"), with no trace of the
    interrupt; the list tells one from a bad file. Only Python's own SIGINT handler,
    in the main thread, is stood in for; elsewhere the list stays empty.
    """
    seen: list[int] = []
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield seen
        return

    def handler(signum, frame):
        seen.append(signum)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _read_table(path: Path, ad, sep: str):
    import pandas as pd  # a dependency of anndata

    with _noting_interrupts() as interrupts:
        try:
            table = pd.read_csv(path, sep=sep, index_col=0)
        except Exception as err:  # noqa: BLE001 - parser, encoding and OS errors alike
            if interrupts:  # a Ctrl-C that pandas reported as a bad file
                raise KeyboardInterrupt(f"interrupted while reading {path}") from None
            raise ValueError(f"{path} is not a readable table ({_reason(err)})") from err
    if table.shape[1] == 0:
        raise ValueError(f"{path} has no feature columns (expected a header of feature names)")
    if table.shape[0] == 0:
        raise ValueError(f"{path} has no rows of cells")
    for column in table.columns:
        if not pd.api.types.is_numeric_dtype(table[column]):
            values = pd.to_numeric(table[column], errors="coerce")
            bad = values.isna() & table[column].notna()
            row = table.index[np.flatnonzero(bad.to_numpy())[0]]
            raise ValueError(
                f"{path}: column {column!r}, row {row!r} holds {table.at[row, column]!r}, "
                "which is not a number"
            )
    X = table.to_numpy(dtype=np.float64)
    adata = ad.AnnData(X=sp.csr_matrix(X))  # a missing entry stays a stored NaN
    adata.obs_names = table.index.astype(str)
    adata.var_names = table.columns.astype(str)
    return adata


def _find(directory: Path, names) -> Path | None:
    for name in names:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _lines(path: Path) -> list[list[str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        return [line.rstrip("\n").split("\t") for line in handle if line.strip()]


def _read_10x(directory: Path, ad):
    matrix = _find(directory, ["matrix.mtx"])
    features = _find(directory, ["features.tsv", "genes.tsv"])
    barcodes = _find(directory, ["barcodes.tsv"])
    missing = [
        name
        for name, found in [
            ("matrix.mtx[.gz]", matrix),
            ("features.tsv[.gz] or genes.tsv[.gz]", features),
            ("barcodes.tsv[.gz]", barcodes),
        ]
        if found is None
    ]
    if missing:
        raise ValueError(f"{directory} is not a 10x directory: no {', '.join(missing)}")
    try:
        X = sp.csr_matrix(scipy.io.mmread(matrix).T)  # stored features x barcodes
        genes, cells = _lines(features), _lines(barcodes)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{directory}: unreadable 10x files ({_reason(err)})") from err
    if len(genes) != X.shape[1] or len(cells) != X.shape[0]:
        raise ValueError(
            f"{directory}: matrix.mtx is {X.shape[1]} features x {X.shape[0]} barcodes, but "
            f"{features.name} lists {len(genes)} features and {barcodes.name} {len(cells)} barcodes"
        )
    adata = ad.AnnData(X=X.astype(np.float32))
    adata.obs_names = [c[0] for c in cells]
    adata.var_names = [g[1] if len(g) > 1 else g[0] for g in genes]
    adata.var["gene_ids"] = [g[0] for g in genes]
    if all(len(g) > 2 for g in genes):
        adata.var["feature_types"] = [g[2] for g in genes]
    adata.var_names_make_unique()
    return adata


# ------------------------------------------------------------------ row blocks
def iter_row_blocks(matrix, block_rows: int | None = None):
    """``(start, stop, block)`` over ``matrix`` (in memory, or a backed AnnData's ``X``:
    an h5py dataset or anndata's sparse dataset) in blocks of rows; each block is
    read on its own, a ``scipy.sparse`` or dense array."""
    n, p = matrix.shape
    rows = block_rows or max(1, ROW_BLOCK_ENTRIES // max(p, 1))
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        yield start, stop, matrix[start:stop]


def read_rows(matrix, columns=None, *, block_rows: int | None = None):
    """``matrix[:, columns]`` read in row blocks.

    Parameters
    ----------
    matrix : ndarray, scipy.sparse matrix, h5py dataset or anndata sparse dataset
        ``(n, p)``.
    columns : ndarray of int, optional
        Columns to keep (all when None).
    block_rows : int, optional
        Rows per block (default: :data:`ROW_BLOCK_ENTRIES` entries).

    Returns
    -------
    ndarray of shape (n, m) for a dense in-memory ``matrix``; otherwise a
    ``scipy.sparse.csr_matrix`` (a backed dense matrix is compressed block by block).
    """
    if isinstance(matrix, np.ndarray):
        return matrix if columns is None else matrix[:, columns]
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix)
        return matrix if columns is None else matrix[:, columns]
    blocks = []
    for _, _, block in iter_row_blocks(matrix, block_rows):
        block = sp.csr_matrix(block)
        blocks.append(block if columns is None else block[:, columns])
    return sp.vstack(blocks, format="csr")


def abundant_features(matrix, n_features: int, *, block_rows: int | None = None) -> np.ndarray:
    """Mask of the ``n_features`` features of largest total (NaN ignored), among those
    with any count; ties go to the lower index. ``(p,)`` bool."""
    total = np.zeros(matrix.shape[1])
    for _, _, block in iter_row_blocks(matrix, block_rows):
        if sp.issparse(block):
            block = sp.csr_matrix(block)
            values = np.where(np.isnan(block.data), 0.0, block.data)
            total += np.bincount(block.indices, weights=values, minlength=matrix.shape[1])
        else:
            total += np.nansum(np.asarray(block, dtype=float), axis=0)
    nonzero = np.flatnonzero(total > 0)
    order = nonzero[np.argsort(-total[nonzero], kind="stable")]
    mask = np.zeros(matrix.shape[1], dtype=bool)
    mask[order[:n_features]] = True
    return mask
