"""Rows read from disk (spfa.backed): reading, validation, and fits that stream them."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

h5py = pytest.importorskip("h5py")
ad = pytest.importorskip("anndata")

from spfa import SparseFactorAnalysis  # noqa: E402
from spfa._validation import NonIntegerCountsWarning  # noqa: E402
from spfa.backed import BackedRows, is_backed  # noqa: E402
from spfa.data import RowBatches  # noqa: E402
from spfa.evaluation import relative_error  # noqa: E402
from spfa.simulate import simulate  # noqa: E402


def _counts(n=120, p=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.gamma(1.0, 1.0, size=(n, p))).astype(np.float32)
    x[rng.random((n, p)) < 0.5] = 0
    return sp.csr_matrix(x)


def _write_h5ad(path, X):
    ad.AnnData(X=X).write_h5ad(path)
    return path


def _write_group(path, X, key="X"):
    """A CSR matrix in AnnData's on-disk encoding, written with h5py alone."""
    X = sp.csr_matrix(X)
    with h5py.File(path, "w") as f:
        g = f.create_group(key)
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["shape"] = np.array(X.shape)
        g["data"], g["indices"], g["indptr"] = X.data, X.indices, X.indptr
    return path


# ----------------------------------------------------------------- reading
def test_reads_rows_of_every_kind_of_source(tmp_path):
    X = _counts()
    dense_path = tmp_path / "dense.h5"
    with h5py.File(dense_path, "w") as f:
        f["M"] = X.toarray()
    backed = ad.read_h5ad(_write_h5ad(tmp_path / "a.h5ad", X), backed="r")
    sources = {
        "backed AnnData": BackedRows(backed),
        "its X": BackedRows(backed.X),
        "h5py group": BackedRows.open(_write_group(tmp_path / "g.h5", X)),
        "dense dataset": BackedRows.open(dense_path, key="M"),
    }
    zarr = pytest.importorskip("zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's note on zarr's format versions
        ad.AnnData(X=X).write_zarr(tmp_path / "a.zarr")
    sources["zarr group"] = BackedRows(zarr.open(tmp_path / "a.zarr", mode="r")["X"])
    for name, rows in sources.items():
        assert rows.shape == X.shape, name
        block = rows.read(7, 31)
        block = block.toarray() if sp.issparse(block) else block
        np.testing.assert_array_equal(block, X[7:31].toarray(), err_msg=name)
        # rows in any order: read as increasing runs, returned in the order asked
        ask = np.array([50, 3, 4, 5, 90, 4])
        got = rows.read_rows(ask)
        got = got.toarray() if sp.issparse(got) else got
        np.testing.assert_array_equal(got, X[ask].toarray(), err_msg=name)
        assert is_backed(rows)
    backed.file.close()


def test_a_shard_and_columns_select_rows_and_features(tmp_path):
    X = _counts(n=101)
    rows = BackedRows.open(_write_group(tmp_path / "g.h5", X), columns=[5, 1, 30])
    shards = [rows.shard(r, 3) for r in range(3)]
    assert [s.shape[0] for s in shards] == [34, 33, 34]
    whole = sp.vstack([s.read(0, len(s)) for s in shards]).toarray()
    np.testing.assert_array_equal(whole, X[:, [5, 1, 30]].toarray())
    assert sum(s.nnz for s in shards) == X.nnz
    with pytest.raises(ValueError, match="rank 3 is not among 3"):
        rows.shard(3, 3)


def test_csc_on_disk_is_refused_with_advice(tmp_path):
    X = _counts()
    path = tmp_path / "c.h5ad"
    ad.AnnData(X=sp.csc_matrix(X)).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    with pytest.raises(ValueError, match="CSC"):
        BackedRows(backed)
    backed.file.close()


# -------------------------------------------------------------- validation
def test_rows_on_disk_are_validated_like_rows_in_memory(tmp_path):
    X = _counts().toarray()
    X[3, 4] = -1.0
    with pytest.raises(ValueError, match="Negative values"):
        SparseFactorAnalysis(2, max_iter=5).fit(BackedRows.open(_write_group(tmp_path / "n.h5", X)))
    # counts within 1e-6 of integers are counts (rounded as they are read)
    Y = _counts().toarray().astype(np.float64)
    Y[Y > 0] += 1e-9
    rows = BackedRows.open(_write_group(tmp_path / "r.h5", Y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: five steps
        warnings.simplefilter("error", NonIntegerCountsWarning)
        SparseFactorAnalysis(2, max_iter=5, random_state=0).fit(rows)
    assert rows.round_counts
    assert np.all(rows.read(0, 10).data == np.rint(rows.read(0, 10).data))
    # non-integer data: one warning for the whole file, however many blocks
    Z = _counts().toarray() * 0.5
    rows = BackedRows.open(_write_group(tmp_path / "z.h5", Z))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        SparseFactorAnalysis(2, max_iter=5).fit(rows)
    assert sum(issubclass(w.category, NonIntegerCountsWarning) for w in record) == 1


# -------------------------------------------------------------------- fits
def test_a_full_batch_fit_from_disk_is_the_fit_in_memory(tmp_path):
    X = _counts()
    rows = BackedRows.open(_write_group(tmp_path / "g.h5", X))
    kw = dict(n_components=3, max_iter=300, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mem = SparseFactorAnalysis(**kw).fit(X)
        disk = SparseFactorAnalysis(**kw).fit(rows)
    np.testing.assert_allclose(disk.components_, mem.components_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(disk.loadings_, mem.loadings_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(disk.transform(rows), mem.transform(X), rtol=1e-5, atol=1e-6)
    assert disk.score(rows) == pytest.approx(mem.score(X), rel=1e-6)


@pytest.mark.parametrize("likelihood", ["poisson", "zt_poisson"])
def test_a_minibatch_fit_reads_one_batch_at_a_time(tmp_path, monkeypatch, likelihood):
    sim = simulate("poisson", n=600, p=100, seed=2)
    rows = BackedRows.open(_write_group(tmp_path / "g.h5", sim.x))
    batches = []
    original = RowBatches._read

    def spy(self, a, e):
        batch = original(self, a, e)
        batches.append(len(batch.rows) if batch.rows is not None else self.shape[0])
        return batch

    monkeypatch.setattr(RowBatches, "_read", spy)
    kw = dict(n_components=3, batch_size=60, random_state=0, likelihood=likelihood)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        disk = SparseFactorAnalysis(**kw).fit(rows)
        monkeypatch.setattr(RowBatches, "_read", original)
        mem = SparseFactorAnalysis(**kw).fit(sp.csr_matrix(sim.x))
    assert batches and max(batches) == 60  # a batch at a time, never the whole matrix
    if likelihood == "poisson":  # (the zero-truncated fit's mean is another quantity)
        err_disk = relative_error(_fitted_mean(disk), sim.mean)
        err_mem = relative_error(_fitted_mean(mem), sim.mean)
        assert err_disk <= err_mem + 0.03, (err_disk, err_mem)
    # the same objective, reached from other batches
    assert disk.elbo_ == pytest.approx(mem.elbo_, rel=2e-3)


def _fitted_mean(est):
    return est.inverse_transform(est.loadings_) * est.training_size_factors_[:, None]


def test_batches_of_a_fixed_number_read_runs_of_rows(tmp_path, monkeypatch):
    """The ranks of a data-parallel fit split their rows into a given number of batches:
    each is still read as a few runs of consecutive rows, not row by row."""
    rows = BackedRows.open(_write_group(tmp_path / "g.h5", _counts(n=400)))
    calls = []
    original = BackedRows.read

    def spy(self, start, stop):
        calls.append(stop - start)
        return original(self, start, stop)

    monkeypatch.setattr(BackedRows, "read", spy)
    data = RowBatches(rows, None, None, entries=False, device="cpu", seed=0, n_batches=8)
    batch = data.batch(3)
    assert len(batch.rows) == 50
    assert len(calls) <= 8 + 1  # RUNS_PER_BATCH runs, one maybe cut by the batch's edge
    np.testing.assert_array_equal(batch.x.numpy(), _counts(n=400)[batch.rows.numpy()].toarray())
