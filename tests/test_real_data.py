"""The real count matrices that ship inside PyPI packages, and a smoke run of
``simulations.real_counts`` on them (skipped where the package is missing)."""

import importlib.util
import json

import numpy as np
import pytest
import scipy.sparse as sp

from simulations import real_counts, real_data

#: name -> (cells, genes) as shipped
SHAPES = {"pbmc68k_reduced": (700, 765), "celltypist_sample": (559, 32786)}


def _needs(name):
    package = real_data.DATASETS[name][0]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install -e .[bench])")


@pytest.fixture(scope="module", params=sorted(SHAPES))
def dataset(request):
    _needs(request.param)
    return request.param, real_data.load(request.param)


def test_dataset_is_integer_counts(dataset):
    name, (x, genes, description) = dataset
    assert sp.issparse(x) and x.format == "csr" and x.dtype == np.float64
    assert x.shape == SHAPES[name] and len(genes) == x.shape[1]
    assert x.data.min() >= 0 and np.all(x.data == np.rint(x.data))
    assert np.all(np.asarray(x.sum(axis=1)).ravel() > 0)
    assert real_data.DATASETS[name][0] in description and "/" in description

    keep = real_data.select_genes(x, 500)
    totals = np.asarray(x.sum(axis=0)).ravel()
    assert keep.size == min(500, np.count_nonzero(totals)) and np.all(totals[keep] > 0)
    assert np.all(np.diff(keep) > 0)
    left_out = np.setdiff1d(np.arange(x.shape[1]), keep)
    assert totals[keep].min() >= totals[left_out].max()


def test_pbmc_counts_are_unit_steps():
    """The smallest count of each cell is 1: the recovered scale is that of UMIs."""
    _needs("pbmc68k_reduced")
    x = real_data.load("pbmc68k_reduced").counts
    smallest = [x.data[x.indptr[i] : x.indptr[i + 1]].min() for i in range(x.shape[0])]
    assert set(smallest) == {1.0}


def test_unknown_or_missing_dataset():
    with pytest.raises(ValueError, match="unknown data set"):
        real_data.load("nope")
    with pytest.raises(real_data.DatasetUnavailable, match="not installed"):
        real_data.package_file("no_such_package_spfa", "data.csv")
    with pytest.raises(real_data.DatasetUnavailable, match="has no"):
        real_data.package_file("simulations", "no_such_file.csv")


def test_spfa_variants_parse_to_estimator_parameters():
    assert real_counts.parse_variant("likelihood=negative_binomial,library_size=False") == {
        "likelihood": "negative_binomial",
        "library_size": False,
    }
    assert real_counts.parse_variant("tol=1e-5,max_iter=10") == {"tol": 1e-5, "max_iter": 10}
    with pytest.raises(ValueError, match="key=value"):
        real_counts.parse_variant("poisson:exp")


def test_heldout_poisson_floors_zero_means():
    x_test = np.array([[0.0, 2.0], [1.0, 0.0]])
    mean = np.array([[1.0, 2.0], [0.0, 1.0]])
    loglik, floored = real_counts.heldout_poisson(x_test, mean)
    assert floored == 1 and np.isfinite(loglik)


@pytest.mark.slow
def test_real_counts_smoke(tmp_path):
    names = [n for n in SHAPES if importlib.util.find_spec(real_data.DATASETS[n][0])]
    if not names:
        pytest.skip("neither scanpy nor celltypist is installed")
    name = "pbmc68k_reduced" if "pbmc68k_reduced" in names else names[0]
    rows = real_counts.main(
        ["--datasets", name, "--k", "2", "--n-genes", "200", "--max-iter", "30"]
        + ["--methods", "spfa", "null", "--out", str(tmp_path)]
        + ["--spfa-variants", "link=softplus,library_size=False"]
    )
    by = {r["method"]: r for r in rows}
    variant = "spfa link=softplus,library_size=False"
    assert set(by) == {"spfa", "null", variant} and all(r["status"] == "ok" for r in rows)
    assert all(np.isfinite(r["loglik"]) and r["loglik"] < 0 for r in rows)
    assert by["null"]["vs_null"] == 0 and by["spfa"]["seconds"] > 0
    assert 1 <= by["spfa"]["n_effective"] <= 2
    assert 0 <= by["spfa"]["pip_share"] <= 1 and 0 <= by["spfa"]["top_abundant"] <= 1
    saved = json.loads((tmp_path / "real_counts.json").read_text())
    assert saved["datasets"][0]["n_genes"] <= 200 and len(saved["rows"]) == 3
    assert "| spfa |" in (tmp_path / "real_counts.md").read_text()
