"""Conformance checks of a likelihood: :func:`check_likelihood`.

A new likelihood (a :class:`spfa.likelihoods.Likelihood` subclass, a wrapper
around one, or a registered name) is checked in one call::

    from spfa.testing import check_likelihood
    check_likelihood(MyLikelihood("softplus"))

Everything runs in float64 on the CPU, on a small grid of ``n = 3`` samples
and ``p = 4`` features whose parameters are the likelihood's own
initialisation from fixed data summaries, moved off their starting values by
a seeded perturbation. A failed check raises :class:`AssertionError` whose
message names the likelihood, the check and the entries that fail.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import torch

from .._convert import to_numpy
from ..expectation import GaussHermite, MonteCarlo
from ..likelihoods import Likelihood, get_likelihood

__all__ = ["check_likelihood"]

_F64 = torch.float64
_N_ROWS, _N_FEATURES = 3, 4
# data summaries the likelihood initialises from (NB: r from 0.5 to 1.3)
_FEATURE_MEAN = np.array([0.5, 2.0, 10.0, 40.0])
_FEATURE_VAR = np.array([1.0, 5.0, 150.0, 2000.0])
_LOG_S = np.log([[0.5], [1.0], [2.0]])
# extreme linear predictors and unconstrained parameter values of [extremes]
_ETA_EXTREME = 60.0
_PARAM_EXTREME = 20.0
# Monte Carlo sizes and the number of standard errors a check tolerates
_N_MC = 100_000
_N_DRAWS = 100_000
_N_SE = 5.0
# tolerance of the normalisation (a sum or integral that is 1 up to rounding)
_NORM_TOL = 1e-8
# a count pmf's tail is cut once every entry's log-probability is below this
_TAIL_LOG_PROB = -60.0
_MAX_COUNT = 2**18


class _Failure(AssertionError):
    """A failed conformance check."""


def _fail(lik: Likelihood, check: str, message: str, where=None):
    detail = "" if where is None else f"\n{where}"
    label = f"{type(lik).__name__} {lik.name!r}"
    raise _Failure(f"check_likelihood({label}) [{check}]: {message}{detail}")


def _tensor(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=_F64)


def check_likelihood(likelihood: str | Likelihood, link="softplus", seed: int = 0) -> None:
    """Check that a likelihood is a normalised, consistent, stable observation model.

    The checks, all in float64, each named in brackets in the message of its
    failure:

    (a) ``[normalisation]`` ``exp(log_prob)`` sums to 1 over ``x = 0, 1, ...``
        (``1, 2, ...`` if ``observes_zeros`` is False) for integer support, or
        integrates to 1 (trapezoid rule over +-40 standard deviations of
        ``variance_function``) otherwise, at every entry of a grid of linear
        predictors from ``-60`` to ``+60`` (``+4`` for a count model whose
        ``h(60)`` exceeds 100);
    (b) ``[expected_log_prob]`` ``expected_log_prob`` under Gauss--Hermite
        quadrature and under Monte Carlo agrees with a Monte Carlo average of
        ``log_prob`` within 5 standard errors (which also checks a closed form);
    (c) ``[sample]`` draws of ``sample(s h(eta), rng)`` have the mean and
        variance of the distribution of (a), within 5 standard errors, and
        take values in its support; ``[mean]`` for a likelihood that observes
        zeros, ``mean(eta)`` is the mean of that distribution;
    (d) ``[extremes]`` ``log_prob`` and its gradients with respect to ``eta``
        and every parameter are finite at ``eta = +-60``, counts up to ``1e4``
        and every parameter at ``+-20`` on its unconstrained scale (a matrix,
        a factor of a low-rank term, at ``+-sqrt(20)``, so that a product of
        two reaches ``+-20``), and so are the ``fitted_attributes``;
    (e) ``[layouts]`` ``log_prob`` on the grid, on a subset of its rows, at
        listed entries and with sparse row gathers agree;
    (f) ``[state_dict]`` the ``state_dict`` survives ``torch.save`` /
        ``torch.load(weights_only=True)`` into a fresh likelihood, giving
        identical ``log_prob``;
    (g) ``[fitted attributes]`` the ``fitted_attributes`` are finite arrays,
        with dispersions and variances positive and zero-inflation
        probabilities in ``[0, 1]``.

    Parameters
    ----------
    likelihood : str or Likelihood
        A registered name, or an instance (copied, never modified).
    link : str or Link, default="softplus"
        Used with a name; an instance keeps its own link.
    seed : int, default=0
        Seeds the parameter perturbation and all random draws.

    Raises
    ------
    AssertionError
        Naming the first check that fails.
    """
    lik = _fresh(likelihood, link)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in lik.parameters():
            prm.add_(0.3 * torch.randn(prm.shape, generator=gen, dtype=_F64))
    rng = np.random.default_rng(seed)
    eta, log_s = _design(lik)
    moments = _check_normalised(lik, eta, log_s)
    x = _check_sample(lik, eta, log_s, moments, rng)
    _check_expectation(lik, x, eta, log_s, gen)
    _check_layouts(lik, x, eta, log_s)
    _check_round_trip(lik, likelihood, link, x, eta, log_s)
    _check_fitted_attributes(lik, "fitted attributes")
    _check_extremes(lik)


def _fresh(likelihood, link) -> Likelihood:
    """An initialised float64 copy, with per-sample parameters for ``_N_ROWS`` rows."""
    lik = get_likelihood(likelihood, link)
    lik.initialize(_FEATURE_MEAN.copy(), _FEATURE_VAR.copy())
    lik.initialize_rows(_N_ROWS)
    return lik.double()


def _design(lik: Likelihood):
    """Linear predictors ``[n, p]`` from -60 to +60 and log size factors ``[n, 1]``."""
    # counts are summed up to where p(x) is negligible: keep their means moderate
    moderate = float(lik.link(_tensor(_ETA_EXTREME))) <= 100.0
    top = _ETA_EXTREME if moderate or not lik.integer_support else 4.0
    eta = _tensor([[-60.0, -6.0, -1.0, 0.5], [1.5, 3.0, top, -20.0], [top, 0.0, 2.0, 4.0]])
    log_s = _tensor(_LOG_S) if lik.positive_mean else None
    return eta, log_s


def _support(lik: Likelihood, eta, log_s):
    """Points ``x`` ``[K, 1, 1]`` (or ``[K, n, p]``) and quadrature weights covering the support."""
    if lik.integer_support:
        start = 0.0 if lik.observes_zeros else 1.0
        k = 256
        while True:
            x = torch.arange(start, start + k, dtype=_F64).view(-1, 1, 1)
            with torch.no_grad():
                tail = lik.log_prob(x[-1:], eta, log_s)
            if bool(torch.isnan(tail).any() | (tail == np.inf).any()):
                _fail(lik, "normalisation", f"log_prob is NaN or +inf at x = {k - 1 + start:g}")
            if bool((tail < _TAIL_LOG_PROB).all()):
                return x, torch.ones_like(x)
            if k >= _MAX_COUNT:
                _fail(lik, "normalisation", f"p(x) has not decayed below exp(-60) by x = {k}")
            k *= 2
    with torch.no_grad():
        mu = lik.mean(eta, log_s)
    sd = torch.as_tensor(np.sqrt(lik.variance_function(to_numpy(mu))), dtype=_F64)
    if not bool(torch.all(torch.isfinite(sd) & (sd > 0))):
        _fail(lik, "normalisation", "variance_function(mean) is not finite and positive")
    z = torch.linspace(-40.0, 40.0, 16001, dtype=_F64).view(-1, 1, 1)
    x = mu + sd * z
    w = torch.full_like(z, float(z[1] - z[0])) * sd
    w[0] = w[-1] = 0.5 * w[0]  # trapezoid rule
    return x, w


def _check_normalised(lik: Likelihood, eta, log_s):
    """(a); returns the first four moments ``(mean, var, m4)`` of each entry, ``[n, p]``."""
    x, w = _support(lik, eta, log_s)
    with torch.no_grad():
        lp = lik.log_prob(x, eta, log_s)
    if not bool(torch.isfinite(lp).all()):
        _fail(lik, "normalisation", "log_prob is not finite on the support")
    prob = torch.exp(lp) * w
    total = prob.sum(0)
    bad = (total - 1.0).abs() > _NORM_TOL
    if bool(bad.any()):
        _fail(
            lik,
            "normalisation",
            "exp(log_prob) does not sum (integrate) to 1 over the support",
            f"eta:\n{to_numpy(eta)}\ntotal:\n{to_numpy(total)}",
        )
    mean = (x * prob).sum(0)
    var = ((x - mean) ** 2 * prob).sum(0)
    m4 = ((x - mean) ** 4 * prob).sum(0)
    return to_numpy(mean), to_numpy(var), to_numpy(m4)


def _check_sample(lik: Likelihood, eta, log_s, moments, rng) -> torch.Tensor:
    """(c); returns one draw ``[n, p]``, the data of the other checks."""
    mean, var, m4 = moments
    with torch.no_grad():
        model_mean = to_numpy(lik.mean(eta, log_s))
    if lik.observes_zeros:
        off = np.abs(model_mean - mean) > 1e-8 * np.abs(mean) + 1e-12
        if off.any():
            _fail(
                lik,
                "mean",
                "mean(eta) is not the mean of exp(log_prob)",
                f"mean(eta):\n{model_mean}\nfrom log_prob:\n{mean}",
            )
    draws = np.asarray(lik.sample(np.broadcast_to(model_mean, (_N_DRAWS,) + mean.shape), rng))
    if draws.shape != (_N_DRAWS,) + mean.shape or not np.isfinite(draws).all():
        _fail(lik, "sample", f"sample() gave shape {draws.shape} or non-finite values")
    if lik.integer_support:
        low = 0.0 if lik.observes_zeros else 1.0
        if not (np.all(draws == np.round(draws)) and draws.min() >= low):
            _fail(lik, "sample", f"sample() gave values outside the integers >= {low:g}")
    se_mean = np.sqrt(var / _N_DRAWS)
    off = np.abs(draws.mean(0) - mean) > _N_SE * se_mean + 1e-12 * (1 + np.abs(mean))
    if off.any():
        _fail(
            lik,
            "sample",
            "the mean of sample() is not that of exp(log_prob)",
            f"draws:\n{draws.mean(0)}\nlog_prob:\n{mean}\nstandard error:\n{se_mean}",
        )
    se_var = np.sqrt(np.maximum(m4 - var**2, 0.0) / _N_DRAWS)
    off = np.abs(draws.var(0) - var) > _N_SE * se_var + 1e-12 * (1 + var)
    if off.any():
        _fail(
            lik,
            "sample",
            "the variance of sample() is not that of exp(log_prob)",
            f"draws:\n{draws.var(0)}\nlog_prob:\n{var}\nstandard error:\n{se_var}",
        )
    return _tensor(draws[0])


def _check_expectation(lik: Likelihood, x, eta, log_s, gen) -> None:
    """(b)."""
    var = _tensor(np.linspace(0.05, 1.0, eta.numel()).reshape(eta.shape))
    with torch.no_grad():
        z = torch.randn((_N_MC,) + tuple(eta.shape), generator=gen, dtype=_F64)
        draws = lik.log_prob(x, eta + torch.sqrt(var) * z, log_s)
        reference, se = draws.mean(0), draws.std(0) / np.sqrt(_N_MC)
        rules = {
            "Gauss-Hermite": (GaussHermite(50), None, _N_SE),
            "Monte Carlo": (MonteCarlo(_N_MC), gen, _N_SE * np.sqrt(2.0)),
        }
        for rule_name, (rule, generator, n_se) in rules.items():
            got = lik.expected_log_prob(x, eta, var, log_s, rule, generator)
            off = (got - reference).abs() > n_se * se + 1e-9 * (1 + reference.abs())
            if not bool(torch.isfinite(got).all()) or bool(off.any()):
                _fail(
                    lik,
                    "expected_log_prob",
                    f"expected_log_prob with {rule_name} differs from the Monte Carlo "
                    "average of log_prob",
                    f"got:\n{to_numpy(got)}\nMonte Carlo:\n{to_numpy(reference)}\n"
                    f"standard error:\n{to_numpy(se)}",
                )


def _check_layouts(lik: Likelihood, x, eta, log_s) -> None:
    """(e): grid, row subset, listed entries and sparse row gathers agree."""
    sub = torch.tensor([2, 0])
    rows, cols = (
        t.flatten()
        for t in torch.meshgrid(torch.arange(_N_ROWS), torch.arange(_N_FEATURES), indexing="ij")
    )
    entry_log_s = None if log_s is None else log_s[rows, 0]
    try:
        with torch.no_grad():
            grid = lik.log_prob(x, eta, log_s)
            sub_log_s = None if log_s is None else log_s[sub]
            rows_only = lik.log_prob(x[sub], eta[sub], sub_log_s, sub)
            entries = lik.log_prob(x[rows, cols], eta[rows, cols], entry_log_s, rows, cols)
            lik.sparse_rows = True
            try:
                sparse_set = lik.sparse_rows is True
                sparse = lik.log_prob(x[rows, cols], eta[rows, cols], entry_log_s, rows, cols)
            finally:
                lik.sparse_rows = False
    except (RuntimeError, IndexError) as error:
        _fail(lik, "layouts", f"log_prob fails on a subset of rows or at listed entries: {error}")
    if not sparse_set:
        _fail(lik, "layouts", "setting sparse_rows = True did not take effect")
    for label, got, want in (
        ("a subset of rows", rows_only, grid[sub]),
        ("listed entries", entries, grid[rows, cols]),
        ("listed entries with sparse_rows", sparse, grid[rows, cols]),
    ):
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-12, atol=1e-12):
            _fail(
                lik,
                "layouts",
                f"log_prob at {label} differs from log_prob on the grid",
                f"got:\n{to_numpy(got)}\ngrid:\n{to_numpy(want)}",
            )


def _check_round_trip(lik: Likelihood, likelihood, link, x, eta, log_s) -> None:
    """(f)."""
    buffer = io.BytesIO()
    torch.save(lik.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = _fresh(likelihood, link)
    try:
        fresh.load_state_dict(state)
    except RuntimeError as error:
        _fail(lik, "state_dict", f"a fresh likelihood does not load the state: {error}")
    with torch.no_grad():
        want = lik.log_prob(x, eta, log_s)
        got = fresh.log_prob(x, eta, log_s)
    if not torch.equal(got, want):
        _fail(lik, "state_dict", "log_prob after a state_dict round trip differs")


def _check_fitted_attributes(lik: Likelihood, check: str) -> None:
    """(g)."""
    positive = ("noise_variance_", "dispersion_", "inverse_dispersion_")
    for key, value in lik.fitted_attributes().items():
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.number) or not np.isfinite(value).all():
            _fail(lik, check, f"fitted attribute {key} is not finite: {value}")
        if key in positive and not np.all(value > 0):
            _fail(lik, check, f"fitted attribute {key} is not positive: {value}")
        if key == "zero_inflation_" and not np.all((value >= 0) & (value <= 1)):
            _fail(lik, check, f"fitted attribute {key} is not in [0, 1]: {value}")


def _check_extremes(lik: Likelihood) -> None:
    """(d): finite values and gradients at extreme predictors, counts and parameters."""
    eta_values = torch.tensor([-_ETA_EXTREME, -1.0, 0.0, 3.0, _ETA_EXTREME], dtype=_F64)
    low = 0.0 if lik.observes_zeros else 1.0
    x_values = torch.tensor([low, low + 1.0, 17.0, 1e4], dtype=_F64)
    # every (eta, x) pair at every entry of the grid, listed as entries
    i, j, r, c = (
        t.flatten()
        for t in torch.meshgrid(
            torch.arange(len(eta_values)),
            torch.arange(len(x_values)),
            torch.arange(_N_ROWS),
            torch.arange(_N_FEATURES),
            indexing="ij",
        )
    )
    e, v = eta_values[i], x_values[j]
    log_s = _tensor(_LOG_S)[r, 0] if lik.positive_mean else None
    original = copy.deepcopy(lik.state_dict())
    settings = {"the perturbed start": None, "all +20": 1.0, "all -20": -1.0, "alternating": 0.0}
    try:
        for label, sign in settings.items():
            with torch.no_grad():
                for prm in lik.parameters():
                    if sign is None:
                        continue
                    # a matrix is a factor: the product of two reaches the extreme
                    size = _PARAM_EXTREME if prm.dim() < 2 else np.sqrt(_PARAM_EXTREME)
                    if sign == 0.0:
                        pattern = torch.arange(prm.numel(), dtype=_F64).remainder(2) * 2 - 1
                        prm.copy_(size * pattern.view(prm.shape))
                    else:
                        prm.fill_(sign * size)
            lik.zero_grad(set_to_none=True)
            eta = e.clone().requires_grad_(True)
            lp = lik.log_prob(v, eta, log_s, r, c)
            where = f"at parameters {label}"
            if not bool(torch.isfinite(lp).all()):
                bad = ~torch.isfinite(lp)
                _fail(
                    lik,
                    "extremes",
                    f"log_prob is not finite {where}",
                    f"(eta, x) = {list(zip(e[bad].tolist(), v[bad].tolist(), strict=True))[:8]}",
                )
            lp.sum().backward()
            if not bool(torch.isfinite(eta.grad).all()):
                bad = ~torch.isfinite(eta.grad)
                _fail(
                    lik,
                    "extremes",
                    f"the gradient of log_prob with respect to eta is not finite {where}",
                    f"(eta, x) = {list(zip(e[bad].tolist(), v[bad].tolist(), strict=True))[:8]}",
                )
            for name, prm in lik.named_parameters():
                if prm.grad is None:
                    _fail(lik, "extremes", f"parameter {name} gets no gradient from log_prob")
                grad = prm.grad.to_dense() if prm.grad.is_sparse else prm.grad
                if not bool(torch.isfinite(grad).all()):
                    _fail(lik, "extremes", f"the gradient of {name} is not finite {where}")
            _check_fitted_attributes(lik, f"fitted attributes {where}")
    finally:
        lik.zero_grad(set_to_none=True)
        lik.load_state_dict(original)
