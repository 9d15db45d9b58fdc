"""save / load: exact round trip, fresh process, refusal of unsafe or broken files."""

import json
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from spfa import SparseFactorAnalysis
from spfa.likelihoods import LIKELIHOODS
from spfa.persistence import FORMAT_VERSION
from spfa.simulate import simulate

GENES = [f"gene{j}" for j in range(40)]

# these tests transform rows without the training size factors on purpose
pytestmark = pytest.mark.filterwarnings("ignore::spfa.SizeFactorsWarning")


def _fit(likelihood="negative_binomial", **kw):
    data = likelihood if likelihood in ("gaussian", "poisson") else "negative_binomial"
    sim = simulate(data, n=60, p=40, pi0=(0.3, 0.8), slab_sd=(1.0, 1.0), seed=3)
    X = pd.DataFrame(sim.x, columns=GENES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = SparseFactorAnalysis(
            3, likelihood=likelihood, max_iter=200, random_state=0, **kw
        ).fit(X, size_factors=np.linspace(0.5, 2, 60) if likelihood != "gaussian" else None)
    return est, X


@pytest.fixture(scope="module")
def fitted():
    return _fit()


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
def test_round_trip_keeps_everything(tmp_path, likelihood):
    est, X = _fit(likelihood)
    est.save(tmp_path / "fit.spfa")
    back = SparseFactorAnalysis.load(tmp_path / "fit.spfa")
    assert back.get_params() == {**est.get_params(), "device": "cpu"}
    for name, value in vars(est).items():
        if name.endswith("_") and isinstance(value, np.ndarray):
            np.testing.assert_array_equal(getattr(back, name), value, err_msg=name)
    assert back.history_ == est.history_
    assert back.elbo_ == est.elbo_ and back.n_iter_ == est.n_iter_
    np.testing.assert_array_equal(back.get_feature_names_out(), est.get_feature_names_out())
    np.testing.assert_array_equal(back.transform(X.iloc[:8]), est.transform(X.iloc[:8]))
    assert back.score(X.iloc[:8]) == est.score(X.iloc[:8])


def test_fresh_process_gives_identical_transform(tmp_path, fitted):
    est, X = fitted
    est.save(tmp_path / "fit.spfa")
    X.iloc[:10].to_csv(tmp_path / "rows.csv", index=False)
    expected = est.transform(X.iloc[:10])
    code = (
        "import numpy as np, pandas as pd, sys\n"
        "from spfa import SparseFactorAnalysis\n"
        "est = SparseFactorAnalysis.load(sys.argv[1])\n"
        "np.save(sys.argv[3], est.transform(pd.read_csv(sys.argv[2])))\n"
    )
    out = tmp_path / "z.npy"
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "fit.spfa"), str(tmp_path / "rows.csv"), out],
        check=True,
    )
    np.testing.assert_array_equal(np.load(out), expected)


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): what a malicious file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_file_crafted_to_run_code_is_refused_not_run(tmp_path, fitted):
    marker = tmp_path / "pwned"
    torch.save({"format": "spfa", "payload": _RunsCode(str(marker))}, tmp_path / "evil.spfa")
    with pytest.raises(ValueError, match="not a readable spfa model"):
        SparseFactorAnalysis.load(tmp_path / "evil.spfa")
    assert not marker.exists()
    # the same object pickled plainly (not a torch archive) is refused too
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_RunsCode(str(marker))))
    with pytest.raises(ValueError, match="not a readable spfa model"):
        SparseFactorAnalysis.load(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_corrupt_truncated_and_foreign_files(tmp_path, fitted):
    est, _ = fitted
    est.save(tmp_path / "fit.spfa")
    data = (tmp_path / "fit.spfa").read_bytes()
    (tmp_path / "short.spfa").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt, truncated"):
        SparseFactorAnalysis.load(tmp_path / "short.spfa")
    (tmp_path / "text.spfa").write_text("hello")
    with pytest.raises(ValueError, match="not a readable spfa model"):
        SparseFactorAnalysis.load(tmp_path / "text.spfa")
    torch.save({"weights": torch.ones(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an spfa model file"):
        SparseFactorAnalysis.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        SparseFactorAnalysis.load(tmp_path / "missing.spfa")


def _edit(path, out, **changes):
    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    torch.save(payload, out)


def test_incompatible_files(tmp_path, fitted):
    est, _ = fitted
    est.save(tmp_path / "fit.spfa")
    _edit(tmp_path / "fit.spfa", tmp_path / "future.spfa", format_version=FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match="reads formats up to"):
        SparseFactorAnalysis.load(tmp_path / "future.spfa")
    params = json.loads(torch.load(tmp_path / "fit.spfa", weights_only=True)["params"])
    _edit(
        tmp_path / "fit.spfa",
        tmp_path / "param.spfa",
        params=json.dumps({**params, "warp_drive": 1}),
    )
    with pytest.raises(ValueError, match="warp_drive"):
        SparseFactorAnalysis.load(tmp_path / "param.spfa")
    state = dict(torch.load(tmp_path / "fit.spfa", weights_only=True)["state"])
    state["factors.mean"] = state["factors.mean"][:5]
    _edit(tmp_path / "fit.spfa", tmp_path / "shape.spfa", state=state)
    with pytest.raises(ValueError, match="inconsistent"):
        SparseFactorAnalysis.load(tmp_path / "shape.spfa")
    _edit(tmp_path / "fit.spfa", tmp_path / "meta.spfa", attributes="{not json")
    with pytest.raises(ValueError, match="corrupt metadata"):
        SparseFactorAnalysis.load(tmp_path / "meta.spfa")


def test_save_refuses_custom_likelihood_and_unfitted(tmp_path):
    from sklearn.exceptions import NotFittedError

    from spfa.likelihoods import Poisson

    with pytest.raises(NotFittedError):
        SparseFactorAnalysis().save(tmp_path / "x.spfa")
    est = SparseFactorAnalysis(1, likelihood=Poisson(), max_iter=50, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(np.random.default_rng(0).poisson(1.0, (20, 10)))
    with pytest.raises(ValueError, match="registered names"):
        est.save(tmp_path / "x.spfa")
    assert not (tmp_path / "x.spfa").exists()


def test_pickle_still_works(fitted):
    est, X = fitted
    back = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(back.transform(X.iloc[:5]), est.transform(X.iloc[:5]))


@pytest.mark.cuda
def test_gpu_fit_loads_on_cpu(tmp_path):
    est, X = _fit(device="cuda")
    est.save(tmp_path / "gpu.spfa")
    back = SparseFactorAnalysis.load(tmp_path / "gpu.spfa", device="cpu")
    assert back.device_.type == "cpu"
    np.testing.assert_allclose(back.components_, est.components_)
    z_gpu, z_cpu = est.transform(X.iloc[:5]), back.transform(X.iloc[:5])
    np.testing.assert_allclose(z_cpu, z_gpu, atol=1e-3)


@pytest.mark.parametrize("likelihood", ["zinb", "zt_negative_binomial"])
def test_format_1_files_load(tmp_path, likelihood):
    """Files of format 1 kept a wrapped likelihood's base parameters unprefixed."""
    est, X = _fit(likelihood)
    est.save(tmp_path / "fit.spfa")
    payload = torch.load(tmp_path / "fit.spfa", weights_only=True)
    payload["format_version"] = 1
    payload["state"] = {
        key.replace("likelihood.base.", "likelihood."): value
        for key, value in payload["state"].items()
    }
    assert "likelihood.log_inverse_dispersion" in payload["state"]
    torch.save(payload, tmp_path / "old.spfa")
    back = SparseFactorAnalysis.load(tmp_path / "old.spfa")
    np.testing.assert_array_equal(back.transform(X.iloc[:5]), est.transform(X.iloc[:5]))


def _crafted(path, tmp_path):
    """A corpus of files a save would never write, each from a real one: (name, edit)."""
    payload = torch.load(path, weights_only=True)
    params = json.loads(payload["params"])
    meta = json.loads(payload["attributes"])
    state = dict(payload["state"])

    def with_params(**kw):
        return {"params": json.dumps({**params, **kw})}

    def with_meta(**kw):
        return {"attributes": json.dumps({**meta, **kw})}

    nan_state = {**state, "factors.mean": torch.full_like(state["factors.mean"], float("nan"))}
    return {
        "params not JSON text": {"params": 5},
        "params a list": {"params": json.dumps([1, 2])},
        "attributes a list": {"attributes": json.dumps([1])},
        "max_iter -1": with_params(max_iter=-1),
        "n_components 0": with_params(n_components=0),
        "learning_rate nan": with_params(learning_rate=float("nan")),
        "unknown likelihood": with_params(likelihood="bernoulli"),
        "unknown prior": with_params(prior="horseshoe"),
        "private attribute": with_meta(_secret={"value": 1}),
        "method shadowed": with_meta(fit={"value": 1}),
        "parameter shadowed": with_meta(max_iter={"value": 1}),
        "not an identifier": with_meta(**{"a b_": {"value": 1}}),
        "attribute entry not a dict": with_meta(elbo_=3.0),
        "arrays not a dict": {"arrays": [torch.ones(2)]},
        "array not a tensor": {"arrays": {**payload["arrays"], "loadings_": "text"}},
        "array name private": {"arrays": {**payload["arrays"], "_x": torch.ones(2)}},
        "state not a dict": {"state": [1, 2]},
        "state value not a tensor": {"state": {**state, "factors.mean": "text"}},
        "state NaN": {"state": nan_state},
        "state missing a key": {"state": {k: v for k, v in state.items() if k != "factors.mean"}},
        "format_version not int": {"format_version": "2"},
    }


def test_crafted_files_are_value_errors_naming_the_problem(tmp_path, fitted):
    est, X = fitted
    est.save(tmp_path / "fit.spfa")
    corpus = _crafted(tmp_path / "fit.spfa", tmp_path)
    for name, change in corpus.items():
        out = tmp_path / "crafted.spfa"
        _edit(tmp_path / "fit.spfa", out, **change)
        with pytest.raises(ValueError) as raised:
            SparseFactorAnalysis.load(out)
        assert str(out) in str(raised.value), (name, raised.value)
    # and the untouched file still loads and transforms as before
    back = SparseFactorAnalysis.load(tmp_path / "fit.spfa")
    np.testing.assert_array_equal(back.components_, est.components_)


def test_save_keeps_links_modes_and_long_names(tmp_path, fitted):
    est, _ = fitted
    # a valid 250-character name (the temporary name must not be longer)
    long = tmp_path / ("m" * 245 + ".spfa")
    est.save(long)
    assert SparseFactorAnalysis.load(long).n_components == est.n_components
    # a symlink at the target stays a link; its target gets the file
    real = tmp_path / "real.spfa"
    link = tmp_path / "link.spfa"
    real.write_bytes(b"old")
    link.symlink_to(real)
    est.save(link)
    assert link.is_symlink() and SparseFactorAnalysis.load(real).n_components == 3
    # a new file's mode follows the umask; an existing file keeps its mode
    old = os.umask(0o022)
    try:
        est.save(tmp_path / "new.spfa")
    finally:
        os.umask(old)
    assert (tmp_path / "new.spfa").stat().st_mode & 0o777 == 0o644
    os.chmod(real, 0o640)
    est.save(link)
    assert real.stat().st_mode & 0o777 == 0o640
    # nothing is left behind
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
