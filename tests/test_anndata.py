"""spfa.anndata: the keys and shapes it writes, against the estimator on the same arrays."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

ad = pytest.importorskip("anndata")

from spfa import SparseFactorAnalysis  # noqa: E402
from spfa import anndata as spfa_anndata  # noqa: E402
from spfa.backed import BackedRows  # noqa: E402

# short fits: the keys and their agreement with the estimator are tested, not convergence
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
PARAMS = {"max_iter": 300, "tol": 1e-3, "random_state": 0, "verbose": 0}


def counts(n=80, p=40, k=2, seed=0):
    """Poisson counts with k sparse programs; genes g0..g{p-1}, cells c0..c{n-1}."""
    rng = np.random.default_rng(seed)
    L = rng.normal(size=(n, k))
    F = rng.normal(size=(p, k)) * (rng.random((p, k)) < 0.3)
    X = rng.poisson(np.exp(0.5 + 0.8 * L @ F.T)).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(X))
    adata.obs_names = [f"c{i}" for i in range(n)]
    adata.var_names = [f"g{j}" for j in range(p)]
    adata.var["hv"] = np.arange(p) % 3 != 0
    adata.obs["group"] = np.where(np.arange(n) < n // 2, "a", "b")
    return adata


def test_keys_shapes_and_values_match_the_estimator_on_the_same_genes():
    adata = counts()
    mask = adata.var["hv"].to_numpy()
    est = spfa_anndata.fit(adata, 3, mask_var="hv", **PARAMS)
    n, p = adata.shape
    assert adata.obsm["X_spfa"].shape == (n, 3)
    assert adata.varm["spfa_factors"].shape == (p, 3)
    assert adata.varm["spfa_pip"].shape == (p, 3)
    assert np.all(adata.varm["spfa_factors"][~mask] == 0)
    assert np.all(adata.varm["spfa_pip"][~mask] == 0)
    assert np.all(np.isnan(adata.var["spfa_intercept"].to_numpy()[~mask]))
    uns = adata.uns["spfa"]
    assert {"params", "elbo", "elbo_contribution", "active"} <= set(uns)
    assert uns["params"]["n_components"] == 3 and uns["mask_var"] == "hv"
    assert len(uns["elbo"]) == len(est.history_["elbo"]) and uns["elbo_contribution"].shape == (3,)
    assert list(est.feature_names_in_) == list(adata.var_names[mask])
    # the oracle: the estimator on the same genes' counts, same seed
    ref = SparseFactorAnalysis(n_components=3, **PARAMS).fit(adata.X[:, mask])
    np.testing.assert_allclose(adata.obsm["X_spfa"], ref.loadings_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adata.varm["spfa_factors"][mask], ref.components_.T, atol=1e-6)
    np.testing.assert_allclose(adata.varm["spfa_pip"][mask], ref.factors_pip_, atol=1e-6)


def test_key_added_layer_and_mask_array():
    adata = counts()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(adata.X.shape, dtype=np.float32)  # an empty X: the layer is fitted
    mask = np.arange(adata.n_vars) < 30
    spfa_anndata.fit(adata, 2, layer="counts", mask_var=mask, key_added="foo", **PARAMS)
    assert {"X_foo"} <= set(adata.obsm) and {"foo_factors", "foo_pip"} <= set(adata.varm)
    assert "foo" in adata.uns and adata.uns["foo"]["layer"] == "counts"
    assert np.all(adata.varm["foo_factors"][30:] == 0)
    assert np.any(adata.varm["foo_factors"][:30] != 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layer": "nope"}, "no layer 'nope'"),
        ({"mask_var": "nope"}, "not a column of adata.var"),
        ({"mask_var": "group_var"}, "must be boolean"),
        ({"mask_var": np.ones(3, dtype=bool)}, "adata has 40 genes"),
        ({"mask_var": np.zeros(40, dtype=bool)}, "selects no genes"),
        ({"size_factors": "nope"}, "not a column of adata.obs"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, match):
    adata = counts()
    adata.var["group_var"] = "x"
    with pytest.raises(ValueError, match=match):
        spfa_anndata.fit(adata, 2, **kwargs, **PARAMS)


def test_size_factors_from_an_obs_column():
    adata = counts()
    adata.obs["sf"] = np.linspace(0.5, 2.0, adata.n_obs)
    est = spfa_anndata.fit(adata, 2, size_factors="sf", **PARAMS)
    np.testing.assert_allclose(est.training_size_factors_, adata.obs["sf"].to_numpy())


def test_backed_file_stays_on_disk_and_fits_as_in_memory(tmp_path, monkeypatch):
    adata = counts()
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    spfa_anndata.fit(adata, 2, mask_var="hv", **PARAMS)

    reads = []
    original = BackedRows.read

    def spy(self, start, stop):
        block = original(self, start, stop)
        reads.append((start, stop, sp.issparse(block), block.shape[1]))
        return block

    monkeypatch.setattr(BackedRows, "read", spy)
    backed = ad.read_h5ad(path, backed="r")
    assert backed.isbacked
    spfa_anndata.fit(backed, 2, mask_var="hv", **PARAMS)
    assert reads and all(sparse for _, _, sparse, _ in reads)  # compressed, never a dense X
    assert {p for *_, p in reads} == {int(adata.var["hv"].sum())}  # the fitted genes only
    # the same rows, in the same order, the same start: the same fit
    np.testing.assert_allclose(backed.obsm["X_spfa"], adata.obsm["X_spfa"], rtol=1e-5, atol=1e-6)
    backed.file.close()


def test_transform_matches_genes_by_name():
    adata = counts()
    est = spfa_anndata.fit(adata, 2, mask_var="hv", **PARAMS)
    new = counts(n=30, seed=1)
    # the same genes in reverse order, and two more the model never saw
    shuffled = new[:, new.var_names[::-1]].copy()
    extra = ad.AnnData(
        X=sp.hstack([shuffled.X, sp.csr_matrix(np.ones((30, 2), dtype=np.float32))]).tocsr()
    )
    extra.obs_names = shuffled.obs_names
    extra.var_names = list(shuffled.var_names) + ["x1", "x2"]
    loadings = spfa_anndata.transform(extra, est, key_added="new")
    mask = new.var["hv"].to_numpy()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="X does not have valid feature names")
        expected = est.transform(new.X[:, mask])
    np.testing.assert_allclose(loadings, expected, rtol=1e-5, atol=1e-6)
    assert extra.obsm["X_new"].shape == (30, 2)
    missing = new[:, :10].copy()
    with pytest.raises(ValueError, match="not in adata.var_names"):
        spfa_anndata.transform(missing, est)


def test_written_file_round_trips(tmp_path):
    adata = counts()
    spfa_anndata.fit(adata, 2, **PARAMS)
    adata.write_h5ad(tmp_path / "out.h5ad")
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_array_equal(back.obsm["X_spfa"], adata.obsm["X_spfa"])
    np.testing.assert_array_equal(back.uns["spfa"]["elbo"], adata.uns["spfa"]["elbo"])
    assert back.uns["spfa"]["params"]["likelihood"] == "poisson"


def test_spfa_itself_does_not_import_anndata():
    code = "import sys, spfa; assert 'anndata' not in sys.modules, 'anndata imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_obs_columns_as_covariates_one_hot_and_numeric():
    adata = counts()
    adata.obs["depth"] = np.linspace(-1.0, 1.0, adata.n_obs)
    mask = adata.var["hv"].to_numpy()
    est = spfa_anndata.fit(adata, 2, mask_var="hv", covariates=["group", "depth"], **PARAMS)
    assert list(est.covariate_names_) == ["group=a", "group=b", "depth"]
    assert adata.uns["spfa"]["covariates"] == ["group=a", "group=b", "depth"]
    C = est.training_covariates_
    np.testing.assert_array_equal(C[:, 0], adata.obs["group"].to_numpy() == "a")
    np.testing.assert_array_equal(C[:, 2], adata.obs["depth"].to_numpy())
    effects = adata.varm["spfa_covariates"]
    np.testing.assert_array_equal(effects[mask], est.covariate_coef_)
    assert np.all(effects[~mask] == 0)
    # new cells: encoded over the fit's levels, from the same obs columns
    new = counts(n=30, seed=1)
    new.obs["depth"] = 0.5
    new.obs["group"] = "b"  # one level only: still the fit's two columns
    loadings = spfa_anndata.transform(new, est)
    C_new, _ = spfa_anndata.covariate_design(new, ["group", "depth"], names=est.covariate_names_)
    assert C_new.shape == (30, 3) and np.all(C_new[:, 1] == 1) and np.all(C_new[:, 0] == 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="X does not have valid feature names")
        direct = est.transform(new[:, est.feature_names_in_].X, covariates=C_new)
    np.testing.assert_allclose(loadings, direct, rtol=1e-5, atol=1e-6)
    new.obs["group"] = "z"
    with pytest.raises(ValueError, match="levels the fit never saw"):
        spfa_anndata.transform(new, est)


@pytest.mark.parametrize(
    "covariates, match", [("nope", "not a column of adata.obs"), ([], "names no adata.obs")]
)
def test_bad_covariate_columns(covariates, match):
    with pytest.raises(ValueError, match=match):
        spfa_anndata.fit(counts(), 2, covariates=covariates, **PARAMS)


def test_an_interrupted_fit_is_written_and_the_interrupt_goes_on(interrupt_at):
    """Ctrl-C once training has a checked state: adata holds that fit, as the estimator
    does, and says where it stopped; the exception carries the estimator."""
    adata = counts()
    interrupt_at(130)
    with pytest.raises(spfa_anndata.FitInterrupted, match="interrupted at step 129") as info:
        spfa_anndata.fit(adata, 3, **{**PARAMS, "tol": 0.0})
    est = info.value.estimator
    assert est.n_iter_ == 129
    np.testing.assert_array_equal(adata.obsm["X_spfa"], est.loadings_)
    np.testing.assert_array_equal(adata.varm["spfa_factors"], est.components_.T)
    assert "interrupted at step 129" in adata.uns["spfa"]["interrupted"]
    assert len(adata.uns["spfa"]["elbo"]) == 100  # the two windows checked before it
    assert "estimator" not in adata.uns["spfa"]["interrupted"]


def test_an_interrupt_before_any_checked_state_leaves_adata_unchanged(interrupt_at):
    adata = counts()
    interrupt_at(7)
    with pytest.raises(KeyboardInterrupt, match="no window was completed") as info:
        spfa_anndata.fit(adata, 3, **PARAMS)
    assert not isinstance(info.value, spfa_anndata.FitInterrupted)
    assert "X_spfa" not in adata.obsm and "spfa" not in adata.uns
