"""Rows of a matrix on disk, read block by block: data larger than memory.

:class:`BackedRows` is what ``SparseFactorAnalysis.fit`` (and ``transform``,
``score``) take in place of an in-memory matrix when the data should stay on
disk: validation, library sizes, the start and every minibatch then read the
rows they need, when they need them, and nothing of ``n x p`` size is ever held.
What stays in memory is per row (``q(L)``: a few floats per row and factor, and
the CSR row pointers: 8 bytes per row) or per feature, and one batch. (A fit
without ``batch_size`` reads all rows once into one dense block and keeps it, as
an in-memory fit does: give ``batch_size`` to stream.)

Sources:

* a backed AnnData (``anndata.read_h5ad(path, backed="r")``, or its ``X``);
* an on-disk CSR matrix in AnnData's encoding -- a group (h5py or zarr) holding
  ``data``, ``indices`` and ``indptr`` arrays with a ``shape`` attribute -- or
  such a group's path (``BackedRows.open(path, key="X")``, h5py);
* a dense 2-D on-disk array (h5py or zarr dataset).

A CSC matrix on disk cannot be read by rows without reading it whole: it is a
``ValueError`` that says so. ``batch_size`` decides what is read at once: every
step reads one batch of rows (drawn as several random runs of consecutive rows,
so that a file ordered by sample or cell type still gives mixed batches); a fit
without ``batch_size`` reads all rows once and keeps them, as an in-memory fit
would. Each rank of a data-parallel fit (:mod:`spfa.distributed`) reads only its
own share: :meth:`BackedRows.shard`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

__all__ = ["BackedRows", "as_backed_rows", "is_backed"]


def _attr_shape(group) -> tuple[int, int]:
    shape = group.attrs.get("shape", group.attrs.get("h5sparse_shape"))
    if shape is None:
        raise ValueError("an on-disk sparse matrix needs a 'shape' attribute (AnnData's encoding)")
    return int(shape[0]), int(shape[1])


class BackedRows:
    """A matrix on disk (or a contiguous range of its rows), read by rows.

    Parameters
    ----------
    source : backed AnnData, on-disk sparse dataset, group or 2-D array
        See the module's docstring.
    rows : slice, optional
        The contiguous range of the source's rows this object stands for (a rank's
        share); all rows by default.
    columns : array-like of int, optional
        The source's columns to keep, in this order (e.g. the genes of a mask);
        all by default.

    Attributes
    ----------
    shape : (int, int)
        Rows and (kept) columns.
    format : {"csr", "dense"}
    dtype : numpy dtype
        The values' type on disk (``read`` returns float32 or float64).
    """

    def __init__(self, source, rows: slice | None = None, columns=None):
        self._owner = None
        group = _unwrap(source)
        self._group = group
        if _is_group(group):
            encoding = str(group.attrs.get("encoding-type", "csr_matrix"))
            if "csc" in encoding:
                raise ValueError(
                    "the matrix on disk is CSC (column-compressed), which cannot be read by "
                    "rows without reading it whole; write it as CSR (e.g. adata.X = "
                    "scipy.sparse.csr_matrix(adata.X) before writing the .h5ad)"
                )
            missing = [name for name in ("data", "indices", "indptr") if name not in group]
            if missing:
                raise ValueError(
                    f"an on-disk sparse matrix needs data, indices and indptr; {missing} missing"
                )
            self.format = "csr"
            full = _attr_shape(group)
        else:
            if len(getattr(group, "shape", ())) != 2:
                raise ValueError(
                    "BackedRows reads a backed AnnData, an on-disk CSR group (data, indices, "
                    f"indptr) or a 2-D on-disk array; got {type(source).__name__}"
                )
            self.format = "dense"
            full = tuple(int(d) for d in group.shape)
        start, stop, step = (rows or slice(None)).indices(full[0])
        if step != 1:
            raise ValueError("BackedRows stands for a contiguous range of rows (a slice of step 1)")
        self._start, self._stop = start, max(start, stop)
        self.columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        self._full = full
        p = full[1] if self.columns is None else len(self.columns)
        self.shape = (self._stop - self._start, p)
        if self.format == "csr":
            # the row pointers of this range: 8 bytes per row, read once
            self._indptr = np.asarray(group["indptr"][self._start : self._stop + 1], np.int64)
            self.dtype = np.dtype(group["data"].dtype)
        else:
            self._indptr = None
            self.dtype = np.dtype(group.dtype)
        #: counts within tolerance of integers, rounded as they are read (set by validation)
        self.round_counts = False

    # -------------------------------------------------------------- opening
    @classmethod
    def open(cls, path, key: str = "X", rows: slice | None = None, columns=None) -> BackedRows:
        """The matrix ``key`` of an HDF5 file (e.g. a ``.h5ad``), kept open while the
        object lives."""
        try:
            import h5py
        except ImportError as err:
            raise ImportError(
                "reading a matrix from disk needs h5py: pip install 'spfa-vi[anndata]'"
            ) from err
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        handle = h5py.File(path, "r")
        if key not in handle:
            handle.close()
            raise ValueError(f"{path} has no {key!r}; it holds {sorted(handle.keys())}")
        out = cls(handle[key], rows, columns)
        out._owner = handle
        return out

    def shard(self, rank: int, size: int) -> BackedRows:
        """Rank ``rank``'s contiguous, nearly equal share of these rows (of ``size``)."""
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not among {size} ranks")
        edges = np.linspace(self._start, self._stop, size + 1).round().astype(int)
        out = BackedRows.__new__(BackedRows)
        out.__dict__.update(self.__dict__)
        out._owner = None  # the file stays this object's to close
        out._start, out._stop = int(edges[rank]), int(edges[rank + 1])
        out.shape = (out._stop - out._start, self.shape[1])
        if self._indptr is not None:
            a = out._start - self._start
            out._indptr = self._indptr[a : a + out.shape[0] + 1]
        return out

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (
            f"BackedRows({self.format}, rows {self._start}:{self._stop} of {self._full[0]}, "
            f"{self.shape[1]} columns)"
        )

    @property
    def nnz(self) -> int:
        """Stored entries of these rows (all of the source's columns)."""
        if self.format == "csr":
            return int(self._indptr[-1] - self._indptr[0])
        return self.shape[0] * self._full[1]

    # -------------------------------------------------------------- reading
    def read(self, start: int, stop: int):
        """Rows ``start:stop`` (of this range) as a canonical ``scipy.sparse.csr_matrix``
        (CSR source) or a dense ndarray, float32 or float64, kept columns only."""
        start, stop = max(0, start), min(self.shape[0], stop)
        stop = max(start, stop)
        a, b = self._start + start, self._start + stop
        if self.format == "csr":
            lo, hi = int(self._indptr[start]), int(self._indptr[stop])
            data = np.asarray(self._group["data"][lo:hi])
            indices = np.asarray(self._group["indices"][lo:hi])
            indptr = self._indptr[start : stop + 1] - lo
            block = sp.csr_matrix(
                (_floating(data), indices, indptr), shape=(stop - start, self._full[1])
            )
            if not block.has_canonical_format:
                block.sum_duplicates()
            if self.columns is not None:
                block = block[:, self.columns]
        else:
            block = _floating(np.asarray(self._group[a:b]))
            if self.columns is not None:
                block = block[:, self.columns]
        if self.round_counts:  # a new array: the source (which may be in memory) stays
            if sp.issparse(block):
                block = sp.csr_matrix(
                    (np.rint(block.data), block.indices, block.indptr), block.shape
                )
            else:
                block = np.rint(block)
        return block

    def read_rows(self, rows: np.ndarray):
        """The rows ``rows`` as one block, in their order, read from disk in increasing
        order as runs of consecutive rows."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return self.read(0, 0)
        if np.any(np.diff(rows) < 0):
            order = np.argsort(rows, kind="stable")
            block = self.read_rows(rows[order])
            return block[np.argsort(order, kind="stable")]
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        runs = np.split(rows, breaks)
        blocks = [self.read(int(r[0]), int(r[-1]) + 1) for r in runs]
        if len(blocks) == 1:
            return blocks[0]
        return sp.vstack(blocks, format="csr") if self.format == "csr" else np.vstack(blocks)

    def blocks(self, block_rows: int):
        """``(start, stop, block)`` over these rows in blocks of ``block_rows``."""
        block_rows = max(1, int(block_rows))
        for start in range(0, self.shape[0], block_rows):
            stop = min(start + block_rows, self.shape[0])
            yield start, stop, self.read(start, stop)

    def close(self) -> None:
        """Close the file :meth:`open` opened (nothing otherwise)."""
        if self._owner is not None:
            self._owner.close()
            self._owner = None


def _floating(a: np.ndarray) -> np.ndarray:
    """float32 and float64 stay; integers (counts on disk) become float32 when exact there."""
    if a.dtype in (np.float32, np.float64):
        return a
    if a.dtype.kind in "iu" and (a.size == 0 or np.abs(a).max() < 2**24):
        return a.astype(np.float32)
    return a.astype(np.float64)


def _is_group(obj) -> bool:
    keys = getattr(obj, "keys", None)
    return callable(keys) and hasattr(obj, "attrs") and not hasattr(obj, "dtype")


def _unwrap(source):
    """The on-disk object behind a backed AnnData or its sparse dataset."""
    if getattr(source, "isbacked", False):  # a backed AnnData
        source = source.X
        if source is None:
            raise ValueError("the backed AnnData has no X")
    group = getattr(source, "group", None)  # anndata's on-disk sparse dataset
    if group is not None and hasattr(source, "format"):
        return group
    return source


def is_backed(X) -> bool:
    """Whether ``X`` is read from disk: a :class:`BackedRows`, a backed AnnData, an
    anndata on-disk sparse dataset, an h5py/zarr group or dataset."""
    if isinstance(X, BackedRows) or getattr(X, "isbacked", False):
        return True
    module = type(X).__module__
    if module.startswith(("h5py", "zarr")):
        return True
    return module.startswith("anndata") and hasattr(X, "group")


def as_backed_rows(X) -> BackedRows:
    """``X`` as a :class:`BackedRows` (itself if it is one)."""
    return X if isinstance(X, BackedRows) else BackedRows(X)
