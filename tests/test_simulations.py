"""Smoke runs of the scripts in simulations/ (one replicate, small settings)."""

import csv
import importlib.util
import json
import sys

import numpy as np
import pytest

from simulations import benchmark, choose_k, figures, real_data, sanity_checks, scale, speed


def test_sanity_benchmark_and_figures_smoke(tmp_path, capsys):
    sanity, bench, figs = tmp_path / "sanity", tmp_path / "bench", tmp_path / "figs"
    summary = sanity_checks.main(
        ["--n-reps", "1", "--seed", "7", "--out", str(sanity), "--notebook-epochs", "50"]
        + ["--designs", "gaussian", "poisson"]
    )
    out = capsys.readouterr().out
    assert "summary over 1 replicates" in out and "time ratio" in out
    data = json.loads((sanity / "results.json").read_text())
    assert {r["start"] for r in data["rows"]} == {"own", "truth", "svd"}
    assert (sanity / "tensorboard" / "gaussian-seed7").is_dir()
    for design in ("gaussian", "poisson"):
        own, svd = summary[design]["own"], summary[design]["svd"]
        assert own["error"] < svd["error"]
        assert own["loadings_ap"] > svd["loadings_ap"] and own["factors_ap"] > svd["factors_ap"]
        assert sum(summary[design]["own"]["calibration"]["count"]) == 3 * (100 + 500)
        posterior = summary[design]["own"]["posterior"]["all"]
        assert 0.5 < posterior["coverage"] <= 1 and 0 <= posterior["sign_accuracy"] <= 1
    assert "credible intervals and lfsr" in out

    rows = benchmark.main(
        ["--n-reps", "1", "--seed", "7", "--out", str(bench), "--designs", "gaussian"]
        + ["--methods", "spfa", "truncated_svd", "nmf_kl", "glmpca"]
    )
    status = {r["method"]: r["status"] for r in rows}
    assert status["spfa"] == status["truncated_svd"] == "ok"
    assert status["nmf_kl"] == status["glmpca"] == "not applicable"
    spfa_row = next(r for r in rows if r["method"] == "spfa")
    assert np.isfinite(spfa_row["heldout_loglik"])
    with open(bench / "benchmark.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    table = (bench / "benchmark.md").read_text()
    assert "not applicable: needs non-negative data" in table

    figures.main(["--sanity", str(sanity), "--benchmark", str(bench), "--out", str(figs)])
    names = {p.name for p in figs.glob("*.png")}
    assert {
        "truth_vs_estimate_gaussian.png",
        "truth_vs_estimate_poisson.png",
        "intervals_poisson.png",
        "elbo_trace.png",
        "calibration.png",
        "support_recovery.png",
        "peers.png",
    } <= names


def test_missing_optional_peer_is_reported(monkeypatch):
    """A peer that is not installed shows up as such, not dropped."""
    monkeypatch.setitem(sys.modules, "mofapy2", None)
    monkeypatch.setitem(sys.modules, "mofapy2.run", None)
    monkeypatch.setitem(sys.modules, "mofapy2.run.entry_point", None)
    from spfa.simulate import simulate

    sim = simulate("poisson", n=30, p=40, seed=2)
    row = benchmark.run_method(
        "mofa+", benchmark.PEERS["mofa+"], sim, sim.x, np.zeros(sim.x.shape, bool), 2, 0, 10
    )
    assert row["status"] == "not installed" and "mofapy2" in row["note"]


def test_choose_k_smoke(caplog):
    caplog.set_level("INFO", logger="simulations.choose_k")
    rows = choose_k.main(["--ks", "1", "3"])
    assert [(m, k) for m, k, _, _ in rows] == [("mask", 1), ("mask", 3), ("thin", 1), ("thin", 3)]
    assert all(kept <= k for _, k, _, kept in rows)
    assert "held-out loglik" in caplog.text


def test_scale_smoke(tmp_path, capsys):
    """One small size, spfa and a peer, each in its own process; the figure is written."""
    rows = scale.main(
        ["--ns", "1000", "--p", "150", "--k", "3", "--batch-size", "50", "--max-iter", "7"]
        + ["--peers", "glmpca", "--peer-max-iter", "20", "--out", str(tmp_path)]
    )
    ours, peer = rows
    assert ours["method"] == "spfa" and ours["status"] == "ok" and ours["passes"] == 7
    assert 0 < ours["error"] < 1 and ours["peak_rss_gib"] > 0 and ours["seconds_per_pass"] > 0
    assert ours["nnz"] < 0.5 * 1000 * 150  # simulated sparse
    # GLM-PCA is an optional extra: fitted where installed, reported as missing otherwise
    assert peer["method"] == "glmpca"
    assert peer["status"] == "ok" or peer["status"].startswith("not installed")
    if peer["status"] == "ok":
        assert np.isfinite(peer["error"]) and peer["fit_seconds"] > 0
    assert (tmp_path / "scale.png").is_file() and (tmp_path / "scale.json").is_file()
    assert "glmpca" in capsys.readouterr().out


def test_speed_smoke(tmp_path, caplog):
    """Tiny sizes: spfa and NMF-KL on the simulation and, where its package is installed,
    one real data set; every row has its times and score, the tables are written."""
    caplog.set_level("INFO", logger="simulations.speed")
    names = [n for n in real_data.DATASETS if importlib.util.find_spec(real_data.DATASETS[n][0])]
    rows = speed.main(
        ["--datasets", *names[:1], "--n-genes", "60", "--sim-n", "200", "--sim-p", "100"]
        + ["--k", "2", "--methods", "spfa", "nmf_kl", "--spfa-params", "max_iter=20"]
        + ["--minibatch-n", "300", "--minibatch-p", "80", "--batch-size", "50"]
        + ["--out", str(tmp_path)]
    )
    mini = [r for r in rows if r["dataset"].startswith("minibatch")]
    rows = [r for r in rows if not r["dataset"].startswith("minibatch")]
    sim = [r for r in rows if r["dataset"].startswith("simulation")]
    real = [r for r in rows if not r["dataset"].startswith("simulation")]
    # the minibatch fit's phases: start (with its traced memory), training, pruning
    assert [r["method"] for r in mini] == ["spfa", "spfa matched"]
    for r in mini:
        assert r["passes"] <= 20 and 0 < r["error"] < 1 and r["start_peak_mib"] > 0
        parts = r["start_seconds"] + r["train_seconds"] + r["prune_seconds"]
        assert 0 < r["prune_seconds"] and parts <= r["seconds"]
        assert np.isclose(r["prune_share"], r["prune_seconds"] / r["seconds"])
    assert [r["method"] for r in sim] == ["spfa", "spfa matched", "nmf_kl"]
    assert [r["method"] for r in real] == (["spfa", "nmf_kl"] if names else [])
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in rows)
    assert all(0 < r["error"] < 1 for r in sim) and all(r["loglik"] < 0 for r in real)
    nmf = {r["dataset"]: r["seconds"] for r in rows if r["method"] == "nmf_kl"}
    for row in rows:
        assert np.isclose(row["vs_reference"], row["seconds"] / nmf[row["dataset"]])
        if row["method"].startswith("spfa"):
            assert row["n_iter"] <= 20 and row["transform_seconds"] > 0 and row["score_seconds"] > 0
            assert np.isclose(row["transform_share"], row["transform_seconds"] / row["seconds"])
        else:
            assert "transform_seconds" not in row
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["settings"]["spfa_params"] == "max_iter=20"
    assert len(saved["rows"]) == len(rows) + len(mini)
    text = (tmp_path / "speed.md").read_text()
    assert text.count("| method | fit s | / nmf_kl |") == 1 + len(names[:1])
    assert "| spfa matched |" in text and "wrote" in caplog.text
    assert "start peak MiB" in text and "pruning / fit" in text


def test_best_rank_svd_error_picks_the_rank_closest_to_the_truth():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(30, 2)) @ rng.normal(size=(2, 40)) * 3.0
    noise = rng.normal(size=truth.shape)
    err, rank = sanity_checks.best_rank_svd_error(truth + noise, truth)
    assert rank == 2
    u, sv, vt = np.linalg.svd(truth + noise, full_matrices=False)
    for r in (1, 3, 10):
        approx = (u[:, :r] * sv[:r]) @ vt[:r]
        assert err <= np.linalg.norm(approx - truth) / np.linalg.norm(truth)
    assert sanity_checks.best_rank_svd_error(truth, truth)[0] < 1e-12


def test_batch_effect_smoke(tmp_path, capsys):
    from simulations import batch_effect

    rows = batch_effect.main(["--n-reps", "1", "--out", str(tmp_path)])
    assert rows[0]["plain_max_batch_corr"] > 0.4 > 0.2 > rows[0]["aware_max_batch_corr"]
    assert rows[0]["batch_coef_corr"] >= 0.9
    assert (tmp_path / "batch_effect.png").stat().st_size > 0
    assert "batch effects recovered" in capsys.readouterr().out


def test_views_smoke(tmp_path, capsys):
    pytest.importorskip("mofapy2")
    from simulations import views

    results = views.main(["--n-reps", "1", "--out", str(tmp_path)])
    for design in results.values():
        summary = design["summary"]
        assert summary["auroc"]["spfa"] >= 0.9
        assert summary["rna_ratio"] <= 0.85
    # the oracle knows F: a fit that learns it is not expected below it in a Gaussian view
    gaussian = results["gaussian_adt"]["summary"]
    assert gaussian["oracle_adt_error"] < gaussian["spfa_adt_error"]
    assert (tmp_path / "views.png").stat().st_size > 0
    assert "| gaussian_adt | adt |" in capsys.readouterr().out


@pytest.mark.parametrize("likelihoods", [("gaussian", "gaussian"), ("poisson", "gaussian")])
def test_views_oracle_is_the_posterior_mean(likelihoods):
    """The oracle's E[x] against the posterior mean of L by brute-force quadrature over
    the slab values of each spike pattern (exact up to the grid where every view is
    Gaussian; the Laplace approximation is close where 150 count features inform L)."""
    from scipy.special import logsumexp
    from scipy.stats import norm, poisson

    from simulations.views import oracle_mean
    from spfa.simulate import ViewSimulation

    rng = np.random.default_rng(3)
    n, pi0 = 2, 0.3
    design = (("a", likelihoods[0], 150), ("b", likelihoods[1], 10))
    groups = np.repeat(["a", "b"], [150, 10])
    f = rng.normal(scale=0.5, size=(160, 2)) * (rng.random((160, 2)) < 0.5)
    b = rng.normal(0.5, 0.5, size=160)
    loadings = rng.normal(size=(n, 2))
    eta = loadings @ f.T + b
    counts = groups == "a" if likelihoods[0] == "poisson" else np.zeros(160, bool)
    mean = np.where(counts, np.logaddexp(0, eta), eta)
    x = np.where(
        counts, rng.poisson(np.where(counts, mean, 1.0)), mean + rng.normal(size=eta.shape)
    )
    sim = ViewSimulation(x, groups, np.ones((2, 2), bool), loadings, f, b, mean)

    grid = np.linspace(-6, 6, 301)
    step = grid[1] - grid[0]
    patterns = {  # (log prior weight of the pattern + log slab density, the L values)
        (0, 0): (np.log(pi0**2), np.zeros((1, 2))),
        (1, 0): (np.log(pi0 * (1 - pi0)) + norm.logpdf(grid) + np.log(step), np.c_[grid, 0 * grid]),
        (0, 1): (np.log(pi0 * (1 - pi0)) + norm.logpdf(grid) + np.log(step), np.c_[0 * grid, grid]),
    }
    g1, g2 = np.meshgrid(grid, grid, indexing="ij")
    both = np.c_[g1.ravel(), g2.ravel()]
    patterns[(1, 1)] = (np.log((1 - pi0) ** 2) + norm.logpdf(both).sum(1) + 2 * np.log(step), both)
    values = np.concatenate([v for _, v in patterns.values()])
    log_prior = np.concatenate([np.broadcast_to(w, len(v)) for w, v in patterns.values()])
    expected = np.empty_like(x)
    for i in range(n):
        e = values @ f.T + b
        ll = np.where(
            counts, poisson.logpmf(x[i], np.logaddexp(0, e)), norm.logpdf(x[i], e, 1.0)
        ).sum(1)
        w = np.exp(log_prior + ll - logsumexp(log_prior + ll))
        e_l = w @ values
        expected[i] = np.where(counts, np.logaddexp(0, e_l @ f.T + b), e_l @ f.T + b)
    got = oracle_mean(sim, design, pi0=pi0)
    tol = 1e-5 if not counts.any() else 1e-2  # a prior pi0 of 0.5 misses by 5e-2 in both
    np.testing.assert_allclose(got, expected, atol=tol * np.abs(expected).max())


def test_detection_smoke(capsys):
    """Seed 1 of the Poisson design: its second factor is found from both starts and adds
    log-likelihood at the truth; a pruned factor's loadings are read as pruning found them."""
    from simulations import detection

    (row,) = detection.main(["--designs", "poisson", "--n-reps", "1"])
    assert row["gain"] > 0
    for start in ("own", "truth"):
        assert row[start]["before"] > 0.7 and row[start]["kept"], row
    assert "| poisson | 1 |" in capsys.readouterr().out

    from simulations.peers import fit_spfa
    from spfa.simulate import simulate

    sim = simulate("poisson", seed=1)
    est = fit_spfa(sim.x, 3, "poisson", seed=1, max_iter=100).estimator
    pruned = ~est.active_components_
    assert pruned.any() and np.all(est.loadings_[:, pruned] == 0)
    assert np.all(np.abs(detection.before_pruning(est)[:, pruned]).max(axis=0) > 0)
