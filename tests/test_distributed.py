"""Data-parallel fits over torch.distributed ranks: 2 gloo processes on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

from spfa import SparseFactorAnalysis
from spfa.distributed import SINGLE, current_group
from spfa.evaluation import match_factors, relative_error
from spfa.simulate import simulate
from spfa.testing.distributed import run_on_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")

N, P, K = 400, 200, 3


# ------------------------------------------------------------- collectives
def _collectives():
    group = current_group()
    r = group.rank
    out = {"size": group.size, "rank": r}
    a, b = group.sum(np.full((2, 3), r + 1.0), r)
    out["sum"], out["sum_scalar"] = a, float(b)
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.full((4,), float(r + 1))
    unused = torch.nn.Parameter(torch.zeros(2))  # no gradient on any rank
    half = torch.nn.Parameter(torch.zeros(2))  # a gradient on rank 1 only
    if r == 1:
        half.grad = torch.ones(2)
    group.sum_gradients_([param, unused, half])
    out["grad"], out["unused_grad"] = param.grad.numpy(), unused.grad
    out["half_grad"] = half.grad.numpy()
    t = torch.full((3,), float(r + 5))
    group.broadcast_([t])
    out["broadcast"] = t.numpy()
    out["seed"] = group.seed(100 + r)
    out["max"], out["all"] = group.max(float(r)), group.all(r == 0)

    def fails_on_rank_1():
        if r == 1:
            raise ValueError("rank 1's own problem")
        return "fine"

    try:
        group.agree(fails_on_rank_1)
        out["agree"] = "returned"
    except ValueError as err:
        out["agree"] = str(err)
    return out


def test_collectives_sum_broadcast_and_agree_across_two_ranks():
    r0, r1 = run_on_ranks(_collectives, 2)
    for r in (r0, r1):
        assert r["size"] == 2
        np.testing.assert_array_equal(r["sum"], np.full((2, 3), 3.0))
        assert r["sum_scalar"] == 1.0
        np.testing.assert_array_equal(r["grad"], np.full(4, 3.0))
        assert r["unused_grad"] is None  # skipped by the optimiser, as in one process
        np.testing.assert_array_equal(r["half_grad"], np.ones(2))
        np.testing.assert_array_equal(r["broadcast"], np.full(3, 5.0))
        assert r["seed"] == 100 and r["max"] == 1.0 and r["all"] is False
    assert (r0["rank"], r1["rank"]) == (0, 1)
    # the failing rank raises its own error; the other learns of it rather than hanging
    assert r1["agree"] == "rank 1's own problem"
    assert "another rank" in r0["agree"]


def test_outside_a_process_group_the_collectives_do_nothing():
    assert current_group() is SINGLE and not SINGLE.parallel and SINGLE.share == 1.0
    a = np.arange(3.0)
    assert SINGLE.sum(a) is a
    assert SINGLE.agree(lambda: 7) == 7


# --------------------------------------------------------------------- fits
DESIGNS = {
    "poisson_full_batch": (dict(likelihood="poisson"), dict(likelihood="poisson")),
    "gaussian_minibatch": (
        dict(likelihood="gaussian"),
        dict(likelihood="gaussian", batch_size=50),
    ),
}


def _data(design):
    return simulate(n=N, p=P, seed=3, **DESIGNS[design][0])


def _fit(design, x, **kw):
    est = SparseFactorAnalysis(K, random_state=0, **{**DESIGNS[design][1], **kw})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning
        return est.fit(x)


def _fit_share(design, **kw):
    group = current_group()
    sim = _data(design)
    rows = np.array_split(np.arange(N), group.size)[group.rank]
    est = _fit(design, sim.x[rows], **kw)
    return {
        "rows": rows,
        "mean": _fitted_mean(est),
        "loadings": est.loadings_,
        "components": est.components_,
        "intercept": est.intercept_,
        "elbo": est.elbo_,
        "history": est.history_["elbo"],
        "n_iter": est.n_iter_,
        "kept": est.n_effective_components_,
        "transform": est.transform(sim.x[rows]),
    }


def _fitted_mean(est):
    """The fitted mean of the training rows, with their size factors."""
    mean, s = est.inverse_transform(est.loadings_), est.training_size_factors_
    return mean if s is None else mean * s[:, None]


def _single(design, **kw):
    sim = _data(design)
    est = _fit(design, sim.x, **kw)
    return sim, est, _fitted_mean(est)


@pytest.mark.slow
@pytest.mark.parametrize("design", list(DESIGNS))
def test_two_ranks_fit_one_model_as_good_as_one_process(design):
    ranks = run_on_ranks(_fit_share, 2, design, timeout=300)
    sim, single, single_mean = _single(design)
    r0, r1 = ranks
    # the global parameters and the training record are identical on every rank
    np.testing.assert_array_equal(r0["components"], r1["components"])
    np.testing.assert_array_equal(r0["intercept"], r1["intercept"])
    assert r0["elbo"] == r1["elbo"] and r0["history"] == r1["history"]
    assert r0["n_iter"] == r1["n_iter"] and r0["kept"] == r1["kept"]
    # each rank keeps (and transforms) its own rows
    assert [len(r["loadings"]) for r in ranks] == [N // 2, N // 2]
    assert r0["transform"].shape == (N // 2, K)
    # one model of all the rows: as close to the truth as the single-process fit
    mean = np.concatenate([r["mean"] for r in ranks])
    err, err_single = relative_error(mean, sim.mean), relative_error(single_mean, sim.mean)
    assert err <= err_single + 0.02, (err, err_single)
    # and the same factors
    loadings = np.concatenate([r["loadings"] for r in ranks])
    kept = single.n_effective_components_
    match = match_factors(
        loadings, r0["components"].T, single.loadings_[:, :kept], single.components_[:kept].T
    )
    assert np.all(match.similarity > 0.95), match.similarity
    # the whole data's ELBO, not one rank's share of it
    assert abs(r0["elbo"] - single.elbo_) < 1e-3 * abs(single.elbo_)


def _bad_rows_on_rank_1():
    group = current_group()
    x = np.random.default_rng(group.rank).poisson(1.0, size=(30, 20)).astype(float)
    if group.rank == 1:
        x[0, 0] = -1.0
    try:
        SparseFactorAnalysis(2, max_iter=5).fit(x)
    except ValueError as err:
        return str(err)
    return "fitted"


def test_bad_input_on_one_rank_is_an_error_on_every_rank():
    r0, r1 = run_on_ranks(_bad_rows_on_rank_1, 2)
    assert "negative" in r1
    assert "another rank" in r0


def _features_disagree():
    group = current_group()
    x = np.ones((30, 20 + group.rank))
    try:
        SparseFactorAnalysis(2, max_iter=5).fit(x)
    except ValueError as err:
        return str(err)
    return "fitted"


def test_ranks_with_different_features_are_an_error():
    for msg in run_on_ranks(_features_disagree, 2):
        assert "disagree on n_features" in msg


# ------------------------------------------------------------ torchrun
@pytest.mark.slow
def test_scale_out_benchmark_under_torchrun(tmp_path):
    """The judged run: ``python -m torch.distributed.run --nproc_per_node=2`` (gloo)."""
    cmd = [
        sys.executable,
        "-m",
        "simulations.scale_out",
        "--nproc=2",
        "--n-rows=400",
        "--n-features=150",
        f"--out={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = json.loads((tmp_path / "scale_out.json").read_text())
    assert table["failed"] == []
    for design in ("poisson_full_batch", "gaussian_minibatch"):
        row = table[design]
        assert row["identical_on_ranks"]
        assert row["parallel_error"] <= row["single_error"] + 0.02


# ---------------------------------------------------------- rows from disk
def _fit_disk_share(path):
    from spfa.backed import BackedRows

    group = current_group()
    rows = BackedRows.open(path).shard(group.rank, group.size)
    est = _fit("gaussian_minibatch", rows)
    return {"components": est.components_, "mean": _fitted_mean(est), "read": rows.shape[0]}


@pytest.mark.slow
def test_each_rank_reads_only_its_share_of_a_file(tmp_path):
    h5py = pytest.importorskip("h5py")
    sim = _data("gaussian_minibatch")
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f["X"] = sim.x
    r0, r1 = run_on_ranks(_fit_disk_share, 2, path, timeout=300)
    np.testing.assert_array_equal(r0["components"], r1["components"])
    assert r0["read"] == r1["read"] == N // 2
    _, _, single_mean = _single("gaussian_minibatch")
    err = relative_error(np.concatenate([r0["mean"], r1["mean"]]), sim.mean)
    assert err <= relative_error(single_mean, sim.mean) + 0.02


def _uneven(rows_of_rank_0):
    group = current_group()
    sim = _data("gaussian_minibatch")
    n0 = rows_of_rank_0
    rows = np.arange(n0) if group.rank == 0 else np.arange(n0, N)
    try:
        est = _fit("gaussian_minibatch", sim.x[rows], batch_size=40, max_iter=20)
    except ValueError as err:
        return str(err)
    return est.components_


def test_uneven_shares_step_through_the_same_number_of_batches():
    # rank 1 holds 390 rows: 10 batches of 40; rank 0's 10 rows make 10 batches of 1
    r0, r1 = run_on_ranks(_uneven, 2, 10)
    np.testing.assert_array_equal(r0, r1)
    # 5 rows cannot make 9 batches: an error on both ranks, not a hang
    r0, r1 = run_on_ranks(_uneven, 2, 5)
    assert "fewer than the 10 batches" in r0
    assert "another rank" in r1


def _given_start_at_other_scales():
    group = current_group()
    rng = np.random.default_rng(group.rank)
    x = rng.normal(size=(60, 12)) * (1.0 if group.rank == 0 else 30.0)  # other units
    start = (rng.normal(size=(60, 2)), np.random.default_rng(9).normal(size=(12, 2)))
    est = SparseFactorAnalysis(2, likelihood="gaussian", max_iter=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(x, init_loadings=start[0], init_factors=start[1])
    return est.components_


def test_a_given_start_leaves_the_ranks_identical():
    # the Gaussian's optimiser units come from the start's data: rank 0's on every rank
    r0, r1 = run_on_ranks(_given_start_at_other_scales, 2)
    np.testing.assert_array_equal(r0, r1)


def _size_factors_on_rank_0_only():
    group = current_group()
    x = np.random.default_rng(group.rank).poisson(1.0, size=(30, 10)).astype(float)
    s = np.ones(30) if group.rank == 0 else None
    try:
        SparseFactorAnalysis(2, max_iter=5).fit(x, size_factors=s)
    except ValueError as err:
        return str(err)
    return "fitted"


def test_ranks_must_give_size_factors_alike():
    for msg in run_on_ranks(_size_factors_on_rank_0_only, 2):
        assert "disagree on whether size_factors are given" in msg


def _fit_share_with_covariates():
    from spfa.simulate import simulate_batch_effect

    group = current_group()
    sim = simulate_batch_effect(n=400, p=150, seed=1)
    rows = np.array_split(np.arange(400), group.size)[group.rank]
    est = SparseFactorAnalysis(4, random_state=0, max_iter=300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(sim.x[rows], covariates=sim.covariates[rows])
    return est.components_, est.covariate_coef_


def test_covariate_effects_are_shared_by_the_ranks():
    from spfa.simulate import simulate_batch_effect

    (c0, b0), (c1, b1) = run_on_ranks(_fit_share_with_covariates, 2, timeout=300)
    np.testing.assert_array_equal(c0, c1)
    np.testing.assert_array_equal(b0, b1)
    sim = simulate_batch_effect(n=400, p=150, seed=1)
    planted = sim.batch_coef - sim.batch_coef.mean(1, keepdims=True)
    fitted = b0 - b0.mean(1, keepdims=True)
    assert np.corrcoef(planted.ravel(), fitted.ravel())[0, 1] >= 0.9


def _views_at_other_scales(groups_on_rank_1=None):
    """Two views on each rank, the Gaussian view in other units on rank 1, from a given
    start: each view's optimiser unit is rank 0's."""
    group = current_group()
    rng = np.random.default_rng(group.rank)
    x = rng.poisson(2.0, size=(60, 12)).astype(float)  # counts: valid in either view
    x[:, 8:] *= 1.0 if group.rank == 0 else 30.0
    groups = np.array(["rna"] * 8 + ["adt"] * 4)
    if group.rank == 1 and groups_on_rank_1 is not None:
        groups = np.asarray(groups_on_rank_1)
    start = (rng.normal(size=(60, 2)), np.random.default_rng(9).normal(size=(12, 2)))
    est = SparseFactorAnalysis(
        2, likelihood={"rna": "poisson", "adt": "gaussian"}, max_iter=30, random_state=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            est.fit(x, feature_groups=groups, init_loadings=start[0], init_factors=start[1])
        except ValueError as err:
            return str(err)
    return est.components_


def test_views_leave_the_ranks_identical_and_must_agree_on_the_groups():
    r0, r1 = run_on_ranks(_views_at_other_scales, 2)
    np.testing.assert_array_equal(r0, r1)
    other = ["adt"] * 4 + ["rna"] * 8  # the same view sizes, other features
    for msg in run_on_ranks(_views_at_other_scales, 2, other):
        assert "disagree on feature_groups" in msg


def _views_without_groups_on_rank_1():
    group = current_group()
    x = np.random.default_rng(group.rank).poisson(1.0, size=(30, 6)).astype(float)
    groups = None if group.rank == 1 else np.array(["a"] * 3 + ["b"] * 3)
    est = SparseFactorAnalysis(2, likelihood={"a": "poisson", "b": "poisson"}, max_iter=5)
    try:
        est.fit(x, feature_groups=groups)
    except ValueError as err:
        return str(err)
    return "fitted"


def test_a_rank_without_feature_groups_stops_every_rank():
    r0, r1 = run_on_ranks(_views_without_groups_on_rank_1, 2, timeout=60)
    assert "another rank" in r0 and "feature_groups" in r1
