"""The data as the ELBO sees them: on the device, whole or in minibatches of rows.

A :class:`RowBatches` holds ``X`` on the device once, dense or -- for a
``scipy.sparse`` matrix -- in compressed (CSR) form, and hands out one batch
of rows at a time:

* ``"grid"`` batches are a dense ``[b, p]`` block of the batch's rows (made
  from the compressed rows, so no ``n x p`` array is ever built), with a mask
  where entries are missing (NaN);
* ``"entries"`` batches list the batch's observed non-zero entries
  ``(rows[e], cols[e], x[e])``: what a zero-truncated likelihood fits, at a
  cost that scales with their number.

Rows on disk (:class:`spfa.backed.BackedRows`) stay there: each batch is read
when it is used, as :data:`RUNS_PER_BATCH` runs of consecutive rows (a file
ordered by sample or cell type still gives mixed batches, and each read is
contiguous); one batch of all rows is read once and kept.

The rows are shuffled once into a fixed partition of ``ceil(n / batch_size)``
batches; each pass visits them in a new random order. A batch's terms are
scaled by the number of batches, so each step's ELBO is an unbiased estimate of
the whole data set's, and a pass's mean is the ELBO itself (up to the drift of
the parameters during the pass).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from .backed import BackedRows
from .model import ELBOTerms

__all__ = ["Batch", "RowBatches", "RUNS_PER_BATCH"]

#: a batch of rows read from disk is this many runs of consecutive rows, drawn at random
RUNS_PER_BATCH = 8


class Batch:
    """One batch: ``x`` (``[b, p]`` or ``[m]``), ``mask`` or None, sample ids ``rows`` (None: all).

    ``cols`` is None for a grid batch; for an entries batch ``entry_rows`` and
    ``cols`` give each entry's sample and feature.
    """

    __slots__ = ("x", "mask", "rows", "entry_rows", "cols", "cache")

    def __init__(self, x, mask, rows, entry_rows=None, cols=None):
        self.x, self.mask, self.rows = x, mask, rows
        self.entry_rows, self.cols = entry_rows, cols
        #: what the likelihood computes from the data alone (and memory it reuses from
        #: step to step), kept while the batch is; ``"reused"``: whether the batch serves
        #: every step (a full batch), so that a costlier cache pays off
        self.cache = {"reused": False}

    def terms(self, model, log_s, expectation, generator, scale: float, covariates=None):
        """The ELBO's terms of this batch, scaled (see :meth:`SparseFactorModel.elbo_terms`);
        ``log_s`` and ``covariates`` are every sample's."""
        index_rows = self.rows if self.cols is None else self.entry_rows
        return model.elbo_terms(
            self.x,
            self.mask,
            log_s,
            expectation,
            generator,
            index_rows,
            self.cols,
            batch=self.rows,
            scale=scale,
            cache=self.cache,
            covariates=covariates,
        )


class RowBatches:
    """``X`` on the device, split into batches of rows.

    Parameters
    ----------
    X : ndarray of shape (n, p) or scipy.sparse matrix
        Validated data, NaN where missing (stored NaN for sparse input).
    log_s : ndarray of shape (n,) or (n, n_views), or None
        Log size factors (a multi-view fit's per view).
    batch_size : int or None
        Rows per batch; None for one batch of all rows.
    entries : bool
        Hand out the observed non-zero entries instead of dense blocks.
    device : torch.device
    seed : int
        Seed of the fixed partition and of each pass's order.
    n_batches : int, optional
        Split the rows into exactly this many batches of nearly equal size instead
        (``batch_size`` is then ignored): the ranks of a data-parallel fit step
        through the same number of batches per pass.
    covariates : ndarray of shape (n, c), optional
        Known covariates of the rows (kept on the device, indexed like ``log_s``).
    """

    def __init__(
        self,
        X,
        log_s,
        batch_size,
        *,
        entries: bool,
        device,
        seed: int,
        n_batches=None,
        covariates=None,
    ):
        n, p = X.shape
        self.shape = (n, p)
        self.device = device
        self.entries = entries
        self._rng = np.random.default_rng(seed)
        if n_batches is not None:
            if not 1 <= n_batches <= n:
                raise ValueError(f"cannot split {n} rows into {n_batches} batches")
            edges = np.linspace(0, n, int(n_batches) + 1).round().astype(int)
            self.bounds = list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))
            b = -(-n // int(n_batches))  # rows per batch (n for one batch)
        else:
            b = n if batch_size is None else min(int(batch_size), n)
            self.bounds = [(a, min(a + b, n)) for a in range(0, n, b)]
        self.n_batches = len(self.bounds)
        self.backed = isinstance(X, BackedRows)
        if self.backed:
            # runs of consecutive rows in a random order: each batch reads a few runs
            run = max(1, -(-max(b, 1) // RUNS_PER_BATCH)) if b < n else n
            starts = np.arange(0, n, run)
            perm = np.concatenate(
                [np.zeros(0, np.int64)]
                + [np.arange(a, min(a + run, n)) for a in self._rng.permutation(starts)]
            )
            perm = perm if b < n else np.arange(n)
        else:
            perm = self._rng.permutation(n) if b < n else np.arange(n)
        self._perm_host = perm
        self._perm = torch.as_tensor(perm, dtype=torch.long, device=device)
        if log_s is not None:  # (n, 1), or a multi-view fit's (n, n_views)
            log_s = np.asarray(log_s)
            self.log_s = self._float(log_s[:, None] if log_s.ndim == 1 else log_s)
        else:
            self.log_s = None
        self.covariates = None if covariates is None else self._float(covariates)
        self.sparse = sp.issparse(X) or entries
        if self.backed:
            self._source = X
            n_missing = int(getattr(X, "n_missing", 0))
            self.has_missing = n_missing > 0 and not entries
            n_nonzero = int(getattr(X, "n_nonzero", X.nnz))
            self.n_observed = n_nonzero if entries else n * p - n_missing
            self.n_evaluated = n_nonzero if entries else n * p
        elif self.sparse:
            # one permuted copy in X's own dtype, which becomes the device tensors
            # (on the CPU without a further copy when X is float32)
            X = sp.csr_matrix(X)
            X = X[perm] if b < n else X
            keep = ~np.isnan(X.data)
            if entries:
                keep &= X.data != 0
            self.has_missing = bool((~keep).any()) and not entries
            if not keep.all() and entries:
                X = sp.csr_matrix((np.where(keep, X.data, 0.0), X.indices, X.indptr), X.shape)
                X.eliminate_zeros()
            del keep
            self._indptr = X.indptr.astype(np.int64)  # host: batch boundaries, no sync
            # and on the device: entries per row, with no host-to-device copy per step
            self._indptr_device = torch.as_tensor(self._indptr, device=device)
            # 4 + 4 bytes per stored entry on the device; each entry's row is
            # recovered per batch from the host indptr
            self._cols = torch.as_tensor(X.indices.astype(np.int32, copy=False), device=device)
            self._values = self._float(X.data)
            n_nan = 0 if entries else int(np.isnan(X.data).sum())
            self.n_observed = X.nnz if entries else n * p - n_nan
            self.n_evaluated = X.nnz if entries else n * p
        else:
            X = np.asarray(X)
            self._dense = self._float(X[perm] if b < n else X)
            n_nan = int(np.isnan(X).sum())
            self.has_missing = n_nan > 0
            self.n_observed = n * p - n_nan
            self.n_evaluated = n * p
        self._order = list(range(self.n_batches))
        self._next = self.n_batches
        # one batch of everything: made once, not at every step
        self._single = self._make(0) if self.n_batches == 1 else None
        if self._single is not None:
            self._single.cache["reused"] = True

    def _float(self, a) -> torch.Tensor:
        a = np.asarray(a, dtype=np.float32)  # a copy unless already float32
        if not a.flags.writeable:
            a = a.copy()
        return torch.as_tensor(a, device=self.device)

    def batch(self, i: int) -> Batch:
        """Batch ``i`` of the fixed partition."""
        return self._single if self._single is not None else self._make(i)

    def _make(self, i: int) -> Batch:
        a, e = self.bounds[i]
        if self.backed:
            return self._read(a, e)
        # one batch of all rows in their own order: no gather of the loadings per step
        rows = None if self.n_batches == 1 else self._perm[a:e]
        if self.sparse:
            e0, e1 = int(self._indptr[a]), int(self._indptr[e])
            # int64 indices for this batch only (stored as int32)
            cols, values = self._cols[e0:e1].long(), self._values[e0:e1]
            local = self._local_rows(a, e)
            if self.entries:
                return Batch(values, None, rows, self._perm[a:e][local], cols)
            x = torch.zeros((e - a, self.shape[1]), dtype=values.dtype, device=self.device)
            x[local, cols] = values
        else:
            x = self._dense[a:e]
        return self._grid_batch(x, rows)

    def _grid_batch(self, x: torch.Tensor, rows) -> Batch:
        """A dense batch, its missing (NaN) entries masked and set to 0."""
        mask = None
        if self.has_missing:
            nan = torch.isnan(x)
            mask = (~nan).to(x.dtype)
            x = torch.where(nan, torch.zeros_like(x), x)
        return Batch(x, mask, rows)

    def _read(self, a: int, e: int) -> Batch:
        """The batch of positions ``a:e`` of the partition, read from disk (its rows in
        increasing order)."""
        if self.n_batches == 1:
            ids, rows = np.arange(self.shape[0]), None
            block = self._source.read(0, self.shape[0])
        else:
            ids = np.sort(self._perm_host[a:e])
            rows = torch.as_tensor(ids, dtype=torch.long, device=self.device)
            block = self._source.read_rows(ids)
        m, p = block.shape
        if self.entries or sp.issparse(block):
            block = sp.csr_matrix(block)
            local = np.repeat(np.arange(m), np.diff(block.indptr))
            values, cols = block.data, block.indices
            if self.entries:  # the observed non-zero entries
                keep = (values != 0) & ~np.isnan(values)
                entry_rows = torch.as_tensor(ids[local[keep]], device=self.device)
                cols = torch.as_tensor(cols[keep].astype(np.int64), device=self.device)
                return Batch(self._float(values[keep]), None, rows, entry_rows, cols)
            x = torch.zeros((m, p), dtype=torch.float32, device=self.device)
            x[
                torch.as_tensor(local, device=self.device),
                torch.as_tensor(cols.astype(np.int64), device=self.device),
            ] = self._float(values)
        else:
            x = self._float(block)
        return self._grid_batch(x, rows)

    def _local_rows(self, a: int, e: int) -> torch.Tensor:
        """Row (within rows ``a:e``) of each stored entry of those rows, ``[nnz]``."""
        counts = torch.diff(self._indptr_device[a : e + 1])
        rows = torch.arange(e - a, device=self.device)
        total = int(self._indptr[e] - self._indptr[a])  # known on the host: no sync
        return torch.repeat_interleave(rows, counts, output_size=total)

    def next_batch(self) -> Batch:
        """The next batch of the current pass; a new pass starts in a new random order."""
        if self._next >= self.n_batches:
            self._order = self._rng.permutation(self.n_batches).tolist()
            self._next = 0
        i = self._order[self._next]
        self._next += 1
        return self.batch(i)

    def __iter__(self):
        """Every batch once, in the fixed order (for evaluation)."""
        return (self.batch(i) for i in range(self.n_batches))

    def step_terms(self, model, expectation, generator):
        """One step's unbiased estimate of the whole ELBO, from the next batch."""
        return self.next_batch().terms(
            model, self.log_s, expectation, generator, float(self.n_batches), self.covariates
        )

    def total_terms(self, model, expectation, generator, n_batches=None) -> ELBOTerms:
        """The whole ELBO, summed over every batch (call under ``torch.no_grad()``);
        with ``n_batches``, estimated from the first ``n_batches`` batches of the fixed
        partition (a random subset of rows), their rows' terms scaled to all rows."""
        used = range(self.n_batches if n_batches is None else n_batches)
        err = kl_l = 0.0
        by_view = None
        for i in used:
            terms = self.batch(i).terms(
                model, self.log_s, expectation, generator, 1.0, self.covariates
            )
            err, kl_l = err + terms.err, kl_l + terms.kl_l
            if terms.err_by_view is not None:
                by_view = terms.err_by_view + (0.0 if by_view is None else by_view)
        seen = sum(self.bounds[i][1] - self.bounds[i][0] for i in used)
        scale = self.shape[0] / seen
        by_view = None if by_view is None else scale * by_view
        # the factors' and intercept's KL do not depend on the batch: counted once
        return ELBOTerms(scale * err, scale * kl_l, terms.kl_f, terms.kl_b, by_view)
