"""Zero-truncated Poisson and NB: against scipy and mpmath, normalisation, gradients, draws."""

import mpmath
import numpy as np
import pytest
import scipy.stats as st
import torch

from spfa.likelihoods import ZeroTruncatedNegativeBinomial, ZeroTruncatedPoisson
from spfa.special import log1mexp_from_log


def test_log1mexp_against_mpmath():
    mpmath.mp.dps = 60
    log_a = [-300.0, -50.0, -20.5, -19.5, -5.0, -0.37, -0.36, 0.0, 2.0, 30.0]
    ours = log1mexp_from_log(torch.tensor(log_a, dtype=torch.float64)).numpy()
    for la, value in zip(log_a, ours, strict=True):
        a = mpmath.exp(mpmath.mpf(la))
        ref = float(mpmath.log(-mpmath.expm1(-a)))
        assert value == pytest.approx(ref, rel=1e-12, abs=1e-300)
    x = torch.tensor(log_a, dtype=torch.float32, requires_grad=True)
    log1mexp_from_log(x).sum().backward()
    assert torch.all(torch.isfinite(x.grad))


def _zt_poisson(dtype=torch.float64):
    lik = ZeroTruncatedPoisson("exp")
    return lik.to(dtype)


def _zt_nb(r, dtype=torch.float64):
    lik = ZeroTruncatedNegativeBinomial("exp")
    lik.initialize(np.ones(1), np.ones(1))
    lik = lik.to(dtype)
    lik.set_inverse_dispersion([r])
    return lik


@pytest.mark.parametrize("mu", [1e-3, 0.3, 2.0, 40.0])
def test_zt_poisson_against_scipy(mu):
    x = np.arange(1, 60, dtype=float)
    eta = torch.full((x.size,), np.log(mu), dtype=torch.float64)
    ours = _zt_poisson().log_prob(torch.tensor(x), eta, None).numpy()
    ref = st.poisson.logpmf(x, mu) - np.log(-np.expm1(-mu))
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mu, r", [(1e-3, 2.0), (0.5, 0.3), (3.0, 5.0), (30.0, 1e4)])
def test_zt_negative_binomial_against_scipy(mu, r):
    x = np.arange(1, 80, dtype=float)
    eta = torch.full((x.size,), np.log(mu), dtype=torch.float64)
    ours = _zt_nb(r).log_prob(torch.tensor(x), eta, None).detach().numpy()
    p = r / (r + mu)
    ref = st.nbinom.logpmf(x, r, p) - np.log(-np.expm1(r * np.log(p)))
    np.testing.assert_allclose(ours, ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("make", [_zt_poisson, lambda: _zt_nb(2.5)])
@pytest.mark.parametrize("mu", [1e-6, 0.2, 7.0])
def test_zero_truncated_pmf_sums_to_one_over_positive_counts(make, mu):
    x = torch.arange(1, 400, dtype=torch.float64)
    eta = torch.full_like(x, np.log(mu))
    total = torch.logsumexp(make().log_prob(x, eta, None), 0).detach()
    assert float(total) == pytest.approx(0.0, abs=1e-9)


def test_tiny_mean_puts_all_mass_on_one_in_float32():
    # mu = exp(-100) underflows float32: p(1 | x > 0) -> 1, p(2 | x > 0) -> 0
    for lik in (_zt_poisson(torch.float32), _zt_nb(3.0, torch.float32)):
        lp = lik.log_prob(
            torch.tensor([1.0, 2.0]), torch.full((2,), -100.0, dtype=torch.float32), None
        ).detach()
        assert float(lp[0]) == pytest.approx(0.0, abs=1e-5)
        assert float(lp[1]) < -90


@pytest.mark.parametrize("cls", [ZeroTruncatedPoisson, ZeroTruncatedNegativeBinomial])
def test_finite_gradients_at_extremes(cls):
    lik = cls("softplus")
    lik.initialize(np.ones(3), np.ones(3))
    eta = torch.tensor([[-100.0, 0.0, 100.0]], requires_grad=True)
    x = torch.tensor([[1.0, 3.0, 1e4]])
    log_s = torch.tensor([[0.5]])
    lp = lik.log_prob(x, eta, log_s)
    assert torch.all(torch.isfinite(lp))
    lp.sum().backward()
    assert torch.all(torch.isfinite(eta.grad))
    params = [p.grad for p in lik.parameters() if p.grad is not None]
    assert all(torch.all(torch.isfinite(g)) for g in params)


def test_samples_are_positive_with_the_truncated_mean():
    rng = np.random.default_rng(0)
    mean = np.full(200_000, 0.8)
    draws = _zt_poisson().sample(mean, rng)
    assert draws.min() >= 1
    assert draws.mean() == pytest.approx(0.8 / (1 - np.exp(-0.8)), rel=0.01)
    nb = _zt_nb(2.0)
    draws = nb.sample(mean, rng)
    p0 = (2.0 / 2.8) ** 2.0
    assert draws.min() >= 1
    assert draws.mean() == pytest.approx(0.8 / (1 - p0), rel=0.01)
