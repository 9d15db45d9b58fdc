"""What a fit shows while it runs: the bar, the log levels, and silence."""

import logging

import numpy as np
import pytest

import spfa.progress
from spfa import SparseFactorAnalysis
from spfa.progress import log_level, verbosity


def _counts():
    rng = np.random.default_rng(0)
    return rng.poisson(np.exp(rng.normal(size=(60, 2)) @ rng.normal(size=(2, 20)) * 0.5))


@pytest.mark.parametrize(
    "verbose, level", [(False, 0), (True, 1), (0, 0), (1, 1), (2, 2), (np.int64(2), 2)]
)
def test_verbose_maps_to_levels(verbose, level):
    assert verbosity(verbose) == level
    assert log_level(verbose) == [logging.WARNING, logging.INFO, logging.DEBUG][level]


@pytest.mark.parametrize("verbose", [3, -1, 1.5, "yes", None])
def test_bad_verbose_is_a_value_error(verbose):
    with pytest.raises(ValueError, match="verbose must be"):
        SparseFactorAnalysis(n_components=2, verbose=verbose).fit(_counts())


def unconfigured_logging(monkeypatch):
    """The root logger as in a script that set nothing up (pytest adds its handlers around
    each test's call, so this runs in the test's body)."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])


def test_bar_and_records_on_stderr_at_1_nothing_at_0(capsys, monkeypatch):
    unconfigured_logging(monkeypatch)
    monkeypatch.setattr(spfa.progress, "BAR_DELAY", 0.0)
    X = _counts()
    est = SparseFactorAnalysis(n_components=3, random_state=0, tol=1e-3, verbose=1).fit(X)
    err = capsys.readouterr().err
    assert "spfa fit" in err and "elbo/entry" in err
    assert "[spfa] " in err  # an INFO record: pruning or ranking
    est.transform(X[:10])
    assert "spfa transform" in capsys.readouterr().err
    est.set_params(verbose=0).fit(X)
    est.transform(X[:10])
    assert capsys.readouterr().err == ""
    # no handler is left behind on the library's logger
    assert all(isinstance(h, logging.NullHandler) for h in logging.getLogger("spfa").handlers)


def test_debug_records_at_2(capsys, monkeypatch):
    unconfigured_logging(monkeypatch)
    monkeypatch.setattr(spfa.progress, "BAR_DELAY", 0.0)
    SparseFactorAnalysis(n_components=2, random_state=0, tol=1e-3, verbose=2).fit(_counts())
    err = capsys.readouterr().err
    assert "[spfa] step     50  elbo" in err  # the per-window DEBUG record


def test_an_application_logging_setup_is_respected(caplog, capsys, monkeypatch):
    """With the application's own handler, spfa adds none: records go to the caller's."""
    monkeypatch.setattr(spfa.progress, "BAR_DELAY", 1e9)  # no bar either
    with caplog.at_level(logging.INFO, logger="spfa"):
        SparseFactorAnalysis(n_components=3, random_state=0, tol=1e-3, verbose=1).fit(_counts())
    assert any(r.name.startswith("spfa") for r in caplog.records)
    assert "[spfa]" not in capsys.readouterr().err
