"""The views of a fit on real data: top features, loadings, contributions, ELBO, overview."""

import importlib.util
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402

import spfa.plotting as plotting  # noqa: E402
from spfa import SparseFactorAnalysis  # noqa: E402
from spfa.plotting import (  # noqa: E402
    plot_elbo,
    plot_factor_contribution,
    plot_loadings,
    plot_overview,
    plot_top_features,
)
from spfa.simulate import MATCHED_FIT, simulate  # noqa: E402

N, P, K = 40, 25, 4


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _axes():
    return Figure().add_subplot()


def _fake_estimator(seed=0, names=True):
    """An object with a fitted estimator's attributes; factor 4 is pruned."""
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(P, K))
    pip = rng.uniform(size=(P, K))
    # feature 0 is strong and included in factors 1 and 2: the union must not repeat it
    factors[0, :2] = [9.0, -9.5]
    pip[0, :2] = 0.99
    # a pruned factor (last) still has entries with PIP >= 0.5: they must not be listed
    active = np.array([True, True, True, False])
    factors[:, 3] *= 20.0
    fake = SimpleNamespace(
        components_=factors.T.copy(),
        factors_pip_=pip,
        loadings_=rng.normal(size=(N, K)),
        active_components_=active,
        elbo_contribution_=np.array([30.0, 20.0, 10.0, 0.0]),
        history_={"elbo": list(-1000.0 + 900.0 * (1 - np.exp(-np.arange(50) / 10)))},
    )
    if names:
        fake.feature_names_in_ = np.array([f"gene{j}" for j in range(P)], dtype=object)
    return fake


def _adata_from(est, key="spfa"):
    """The AnnData layout of ``spfa.anndata.fit``, holding the estimator's arrays."""
    ad = pytest.importorskip("anndata")
    n, p = est.loadings_.shape[0], est.components_.shape[1]
    adata = ad.AnnData(X=np.zeros((n, p), dtype=np.float32))
    names = getattr(est, "feature_names_in_", [f"feature {j}" for j in range(p)])
    adata.var_names = [str(s) for s in names]
    adata.obsm[f"X_{key}"] = np.asarray(est.loadings_)
    adata.varm[f"{key}_factors"] = np.asarray(est.components_).T
    adata.varm[f"{key}_pip"] = np.asarray(est.factors_pip_)
    adata.uns[key] = {
        "elbo": np.asarray(est.history_["elbo"], dtype=float),
        "elbo_contribution": np.asarray(est.elbo_contribution_),
        "active": np.asarray(est.active_components_),
        "params": {"n_components": est.components_.shape[0]},
    }
    return adata


def _expected_top_rows(factors, pip, active, n_top, min_pip):
    """The union of each kept factor's top features, in factor order, computed plainly."""
    rows = []
    for t in range(factors.shape[1]):
        if not active[t]:
            continue
        candidates = [
            (-abs(factors[j, t]), j) for j in range(factors.shape[0]) if pip[j, t] >= min_pip
        ]
        for _, j in sorted(candidates)[:n_top]:
            if j not in rows:
                rows.append(j)
    return rows


def _labels(ticklabels):
    return [t.get_text() for t in ticklabels]


def _recover_order(image, loadings):
    """Indices of the cells whose kept loadings make up the image's rows."""
    return np.array([int(np.flatnonzero((loadings == row).all(axis=1))[0]) for row in image])


@pytest.fixture(scope="module")
def fitted():
    sim = simulate("poisson", n=60, p=30, pi0=(0.5, 0.5, 0.6), slab_sd=(1.5, 1.5, 1.5), seed=0)
    pd = pytest.importorskip("pandas")
    x = pd.DataFrame(sim.x, columns=[f"G{j}" for j in range(sim.x.shape[1])])
    est = SparseFactorAnalysis(n_components=4, max_iter=200, random_state=0, **MATCHED_FIT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(x)
    assert est.active_components_.any() and not est.active_components_.all()
    return est


# --- top features -------------------------------------------------------------------------------


@pytest.mark.parametrize("n_top, min_pip", [(3, 0.5), (5, 0.8), (1, 0.0)])
def test_top_features_rows_are_the_union_of_each_kept_factors_top_genes(n_top, min_pip):
    est = _fake_estimator()
    factors, pip, active = est.components_.T, est.factors_pip_, est.active_components_
    ax = plot_top_features(est, n_top, min_pip=min_pip, ax=_axes())
    rows = _expected_top_rows(factors, pip, active, n_top, min_pip)
    assert _labels(ax.get_yticklabels()) == [f"gene{j}" for j in rows]
    assert _labels(ax.get_xticklabels()) == ["1", "2", "3"]  # the pruned factor 4 is left out
    image = ax.images[0]
    np.testing.assert_array_equal(image.get_array(), factors[np.ix_(rows, [0, 1, 2])])
    vmin, vmax = image.get_clim()
    assert vmin == -vmax and vmax == pytest.approx(np.abs(factors[np.ix_(rows, [0, 1, 2])]).max())
    # one dot per shown entry with PIP >= min_pip
    dots = ax.collections[0].get_offsets()
    assert len(dots) == int((pip[np.ix_(rows, [0, 1, 2])] >= min_pip).sum())
    assert len(ax.figure.axes) == 2  # the heatmap and its colourbar


def test_top_features_lists_a_feature_shared_by_two_factors_once():
    est = _fake_estimator()
    labels = _labels(plot_top_features(est, 3, ax=_axes()).get_yticklabels())
    assert labels[0] == "gene0"
    assert labels.count("gene0") == 1


def test_top_features_default_names_without_feature_names_in():
    est = _fake_estimator(names=False)
    labels = _labels(plot_top_features(est, 2, ax=_axes()).get_yticklabels())
    assert labels and all(label.startswith("feature ") for label in labels)
    rows = _expected_top_rows(est.components_.T, est.factors_pip_, est.active_components_, 2, 0.5)
    assert labels == [f"feature {j}" for j in rows]


def test_top_features_with_no_feature_above_min_pip_draws_no_heatmap():
    est = _fake_estimator()
    est.factors_pip_ = np.zeros_like(est.factors_pip_)
    ax = plot_top_features(est, ax=_axes())
    assert not ax.images
    assert "PIP" in ax.texts[0].get_text()


@pytest.mark.parametrize("n_top, min_pip", [(0, 0.5), (2.5, 0.5), (True, 0.5), (3, 1.5)])
def test_top_features_rejects_bad_n_top_and_min_pip(n_top, min_pip):
    with pytest.raises(ValueError, match="n_top|min_pip"):
        plot_top_features(_fake_estimator(), n_top, min_pip=min_pip, ax=_axes())


# --- loadings -----------------------------------------------------------------------------------


def _dominant(loadings):
    scaled = loadings / np.abs(loadings).max(axis=0)
    dominant = np.abs(scaled).argmax(axis=1)
    return dominant, scaled[np.arange(len(scaled)), dominant]


def test_loadings_orders_cells_by_dominant_factor_then_loading():
    est = _fake_estimator()
    kept = est.loadings_[:, :3]
    ax = plot_loadings(est, ax=_axes())
    image = np.asarray(ax.images[0].get_array())
    assert image.shape == (N, 3)
    order = _recover_order(image, kept)
    assert sorted(order) == list(range(N))
    dominant, value = _dominant(kept)
    assert np.all(np.diff(dominant[order]) >= 0)
    for t in range(3):
        within = value[order][dominant[order] == t]
        assert np.all(np.diff(within) <= 0)


def test_loadings_subsamples_evenly_along_the_order():
    est = _fake_estimator()
    full = np.asarray(plot_loadings(est, ax=_axes()).images[0].get_array())
    ax = plot_loadings(est, ax=_axes(), max_cells=10)
    shown = np.asarray(ax.images[0].get_array())
    assert shown.shape == (10, 3)
    positions = _recover_order(shown, full)  # rows of the full ordered image
    assert positions[0] == 0 and positions[-1] == N - 1
    assert np.all(np.diff(positions) > 0)
    assert "10 of 40 cells" in ax.get_title()


def test_loadings_groupby_obs_column_orders_cells_by_category():
    pd = pytest.importorskip("pandas")
    est = _fake_estimator()
    adata = _adata_from(est)
    rng = np.random.default_rng(1)
    categories = ["T cell", "B cell", "NK"]  # not alphabetical: the categories' order is kept
    adata.obs["cell_type"] = pd.Categorical(rng.choice(categories, size=N), categories=categories)
    ax = plot_loadings(adata, groupby="cell_type", ax=_axes())
    order = _recover_order(np.asarray(ax.images[0].get_array()), est.loadings_[:, :3])
    codes = adata.obs["cell_type"].cat.codes.to_numpy()
    assert np.all(np.diff(codes[order]) >= 0)
    # within each group, by dominant factor
    dominant, _ = _dominant(est.loadings_[:, :3])
    for code in range(3):
        assert np.all(np.diff(dominant[order][codes[order] == code]) >= 0)
    assert _labels(ax.get_yticklabels()) == categories
    boundaries = sorted(line.get_ydata()[0] for line in ax.lines)
    counts = np.bincount(codes, minlength=3)
    np.testing.assert_allclose(boundaries, np.cumsum(counts)[:-1] - 0.5)


def test_loadings_groupby_array_works_for_an_estimator():
    est = _fake_estimator()
    groups = np.where(np.arange(N) % 3 == 0, "b", "a")
    ax = plot_loadings(est, groupby=groups, ax=_axes())
    order = _recover_order(np.asarray(ax.images[0].get_array()), est.loadings_[:, :3])
    assert list(groups[order]) == sorted(groups)
    assert _labels(ax.get_yticklabels()) == ["a", "b"]


def test_loadings_groupby_errors():
    est = _fake_estimator()
    with pytest.raises(ValueError, match="needs an AnnData"):
        plot_loadings(est, groupby="cell_type", ax=_axes())
    with pytest.raises(ValueError, match="one per cell"):
        plot_loadings(est, groupby=np.zeros(N - 1), ax=_axes())
    adata = _adata_from(est)
    with pytest.raises(ValueError, match=r"'nope' is not a column of adata\.obs"):
        plot_loadings(adata, groupby="nope", ax=_axes())


# --- contributions and ELBO ---------------------------------------------------------------------


def test_factor_contribution_bars_grey_for_pruned_factors():
    est = _fake_estimator()
    ax = plot_factor_contribution(est, ax=_axes())
    bars = ax.patches
    assert [b.get_height() for b in bars] == [30.0, 20.0, 10.0, 0.0]
    grey = to_rgba(plotting._PRUNED_COLOUR)
    assert [b.get_facecolor() == grey for b in bars] == [False, False, False, True]
    assert len({b.get_facecolor() for b in bars[:3]}) == 1


def test_elbo_plots_the_recorded_curve():
    est = _fake_estimator()
    ax = plot_elbo(est, ax=_axes())
    x, y = ax.lines[0].get_data()
    np.testing.assert_array_equal(y, est.history_["elbo"])
    np.testing.assert_array_equal(x, np.arange(1, 51))
    assert ax.get_xscale() == "log"


def test_plots_make_their_own_figure_without_ax():
    est = _fake_estimator()
    before = len(plt.get_fignums())
    for plot in (plot_top_features, plot_loadings, plot_factor_contribution, plot_elbo):
        assert plot(est).figure is not None
    assert len(plt.get_fignums()) == before + 4


# --- estimator and AnnData ----------------------------------------------------------------------


def test_estimator_and_anndata_with_the_same_arrays_draw_the_same(fitted):
    adata = _adata_from(fitted)
    groups = np.where(np.arange(fitted.loadings_.shape[0]) < 25, "x", "y")
    for draw in (
        lambda s: plot_top_features(s, 4, ax=_axes()),
        lambda s: plot_loadings(s, groupby=groups, ax=_axes()),
    ):
        a, b = draw(fitted), draw(adata)
        np.testing.assert_array_equal(a.images[0].get_array(), b.images[0].get_array())
        assert _labels(a.get_yticklabels()) == _labels(b.get_yticklabels())
        assert _labels(a.get_xticklabels()) == _labels(b.get_xticklabels())
    a, b = plot_factor_contribution(fitted, ax=_axes()), plot_factor_contribution(adata, ax=_axes())
    assert [p.get_height() for p in a.patches] == [p.get_height() for p in b.patches]
    assert [p.get_facecolor() for p in a.patches] == [p.get_facecolor() for p in b.patches]
    # real gene names, only kept factors, and the fit's own top features
    ax = plot_top_features(fitted, 4, ax=_axes())
    names = fitted.feature_names_in_
    rows = _expected_top_rows(
        fitted.components_.T, fitted.factors_pip_, fitted.active_components_, 4, 0.5
    )
    assert _labels(ax.get_yticklabels()) == [names[j] for j in rows]
    assert len(ax.get_xticks()) == fitted.active_components_.sum()


def test_anndata_key_added_is_honoured():
    est = _fake_estimator()
    adata = _adata_from(est, key="nmf")
    ax = plot_top_features(adata, 3, key="nmf", ax=_axes())
    rows = _expected_top_rows(est.components_.T, est.factors_pip_, est.active_components_, 3, 0.5)
    assert _labels(ax.get_yticklabels()) == [f"gene{j}" for j in rows]
    with pytest.raises(ValueError, match=r"adata has no obsm\['X_spfa'\].*spfa\.anndata\.fit"):
        plot_top_features(adata, ax=_axes())


def test_anndata_missing_entries_are_named():
    adata = _adata_from(_fake_estimator())
    del adata.varm["spfa_pip"]
    with pytest.raises(ValueError, match=r"varm\['spfa_pip'\]"):
        plot_elbo(adata, ax=_axes())
    adata = _adata_from(_fake_estimator())
    del adata.uns["spfa"]["active"]
    with pytest.raises(ValueError, match="'active'"):
        plot_elbo(adata, ax=_axes())


def test_not_a_fit_is_a_value_error():
    with pytest.raises(ValueError, match="components_"):
        plot_elbo(SparseFactorAnalysis(n_components=2), ax=_axes())
    with pytest.raises(ValueError, match="fitted SparseFactorAnalysis or an AnnData"):
        plot_overview(np.zeros((3, 3)))
    bad = _fake_estimator()
    bad.factors_pip_ = bad.factors_pip_[:, :2]
    with pytest.raises(ValueError, match="factors_pip"):
        plot_top_features(bad, ax=_axes())


# --- overview -----------------------------------------------------------------------------------


def test_overview_saves_a_png(fitted, tmp_path):
    before = len(plt.get_fignums())
    fig = plot_overview(fitted, groupby=np.arange(fitted.loadings_.shape[0]) % 2)
    assert isinstance(fig, Figure)
    assert len(plt.get_fignums()) == before  # not a pyplot figure
    main = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(main) == 4
    assert [len(ax.images) for ax in main] == [1, 1, 0, 0]
    path = tmp_path / "overview.png"
    fig.savefig(path)
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overview_from_anndata_with_obs_groupby(tmp_path):
    pd = pytest.importorskip("pandas")
    adata = _adata_from(_fake_estimator())
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(N) < 10, "b1", "b2"))
    fig = plot_overview(adata, groupby="batch", n_top=2)
    loadings_ax = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"][1]
    assert _labels(loadings_ax.get_yticklabels()) == ["b1", "b2"]
    fig.savefig(tmp_path / "overview.png")
    with pytest.raises(ValueError, match="not a column of adata.obs"):
        plot_overview(adata, groupby="nope")


def test_module_imports_neither_pyplot_nor_anndata(monkeypatch, tmp_path):
    """A fresh copy of the module loads, and draws an overview, with both made unimportable."""
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    monkeypatch.setitem(sys.modules, "anndata", None)
    path = Path(plotting.__file__)
    spec = importlib.util.spec_from_file_location("spfa._plotting_import_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.plot_overview(_fake_estimator()).savefig(tmp_path / "overview.png")
    with pytest.raises(ImportError):
        module.plot_elbo(_fake_estimator())  # ax=None is the one path that needs pyplot
