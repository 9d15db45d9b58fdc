"""Smoke run of the main job (one replicate, a short notebook baseline)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations"))

import sanity_checks  # noqa: E402


def test_sanity_checks_smoke(tmp_path, capsys):
    summary = sanity_checks.main(
        ["--n-reps", "1", "--seed", "7", "--out", str(tmp_path), "--notebook-epochs", "50"]
    )
    out = capsys.readouterr().out
    assert "summary" in out and "time ratio" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["rows"]) == 2
    assert (tmp_path / "tensorboard" / "gaussian-seed7").is_dir()
    for lik in ("gaussian", "poisson"):
        assert summary[lik]["spfa_over_best_peer"] < 1.0
