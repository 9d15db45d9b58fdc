"""Log-probabilities against scipy (float64 oracle), extreme arguments, registry."""

import mpmath
import numpy as np
import pytest
import scipy.stats as st
import torch

from spfa.expectation import GaussHermite, MonteCarlo
from spfa.likelihoods import (
    LIKELIHOODS,
    Gaussian,
    Likelihood,
    NegativeBinomial,
    Poisson,
    get_likelihood,
)
from spfa.links import get_link
from spfa.special import lgamma_ratio


def softplus64(eta):
    return np.logaddexp(0.0, eta)


def nb_logpmf_mp(x, mu, r):
    """NB log-pmf at 50 digits (scipy's float64 lgamma difference loses ~1e-7 at r = 1e8)."""
    with mpmath.workdps(50):
        x, mu, r = mpmath.mpf(x), mpmath.mpf(mu), mpmath.mpf(r)
        out = (
            mpmath.loggamma(x + r)
            - mpmath.loggamma(r)
            - mpmath.loggamma(x + 1)
            + r * mpmath.log(r / (r + mu))
            + x * mpmath.log(mu / (r + mu))
        )
        return float(out)


def _nb(r, dtype=torch.float32, link="softplus"):
    lik = NegativeBinomial(link)
    lik.initialize(np.ones(len(r)), np.ones(len(r)))
    lik = lik.to(dtype)
    lik.set_inverse_dispersion(r)
    return lik


X = np.array([0, 1, 3, 10, 100, 1000, 0, 7], dtype=float)
ETA = np.array([-100, -20, -3, 0, 2, 7, 100, 30], dtype=float)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_poisson_softplus_against_scipy(dtype):
    lik = Poisson("softplus").to(dtype)
    s = np.array([0.5, 1.0, 2.0, 1.0, 3.0, 0.1, 1.0, 1.0])
    got = lik.log_prob(
        torch.tensor(X, dtype=dtype),
        torch.tensor(ETA, dtype=dtype),
        torch.tensor(np.log(s), dtype=dtype),
    )
    want = st.poisson.logpmf(X, s * softplus64(ETA))
    # float32 values below ~1e-38 are denormal: compare those absolutely
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(got.double().numpy(), want, rtol=rtol, atol=1e-30)


def test_poisson_exp_against_scipy():
    lik = Poisson("exp")
    eta = np.array([-80.0, -3, 0, 2, 7, 80])
    x = np.array([0, 1, 3, 10, 100, 1.0])
    got = lik.log_prob(torch.tensor(x), torch.tensor(eta), None).numpy()
    np.testing.assert_allclose(got, st.poisson.logpmf(x, np.exp(eta)), rtol=1e-10)


@pytest.mark.parametrize("r", [1e-2, 0.5, 3.0, 50.0, 1e3, 1e5, 1e8, 9e9])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_negative_binomial_against_scipy(r, dtype):
    s = np.ones(len(X))
    lik = _nb(np.full(len(X), r), dtype)
    # one feature per entry: treat the vectors as a 1 x p matrix
    got = (
        lik.log_prob(torch.tensor(X[None], dtype=dtype), torch.tensor(ETA[None], dtype=dtype), None)
        .detach()
        .double()
        .numpy()[0]
    )
    mu = s * softplus64(ETA)
    want = np.array([nb_logpmf_mp(xi, mi, r) for xi, mi in zip(X, mu, strict=True)])
    if dtype == torch.float64:
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    else:
        # a few float32 ulps of the O(x |log mu|) terms
        bound = 2e-5 * (1 + X * np.abs(np.log(mu))) + 1e-6 * np.abs(want)
        assert np.all(np.abs(got - want) <= bound), np.c_[got, want, bound]


def test_negative_binomial_zero_count_is_exact_for_huge_r():
    r = np.array([1e8])
    lik = _nb(r)
    got = lik.log_prob(torch.zeros(1, 1), torch.tensor([[0.0]]), None).item()
    # log p(0) = r log(r / (r + mu)) -> -mu = -log 2
    want = st.nbinom.logpmf(0, 1e8, 1e8 / (1e8 + np.log(2)))
    assert got == pytest.approx(want, rel=1e-6)
    assert got != 0.0


def test_lgamma_ratio_against_scipy():
    x = torch.tensor([0.0, 1, 5, 50, 1000, 1e5])
    for r in [1e-3, 0.3, 7.9, 8.1, 1e2, 1e4, 1e6, 1e8]:
        with mpmath.workdps(50):
            want = np.array(
                [float(mpmath.loggamma(xi + r) - mpmath.loggamma(r)) for xi in x.tolist()]
            )
        got32 = lgamma_ratio(x, torch.full_like(x, r)).double().numpy()
        np.testing.assert_allclose(got32, want, rtol=2e-6, atol=1e-4)
        got64 = lgamma_ratio(x.double(), torch.full_like(x.double(), r)).numpy()
        np.testing.assert_allclose(got64, want, rtol=1e-10, atol=1e-9)


def test_gaussian_against_scipy_and_exact_expectation():
    lik = Gaussian()
    var = np.array([0.3, 2.0, 5.0])
    lik.initialize(np.zeros(3), var)
    lik = lik.double()
    x = torch.tensor([[0.5, -1.0, 4.0]], dtype=torch.float64)
    eta = torch.tensor([[0.1, 0.2, -3.0]], dtype=torch.float64)
    nv = lik.noise_variance.double().detach().numpy()
    np.testing.assert_allclose(nv, var, rtol=1e-6)
    got = lik.log_prob(x, eta, None).detach().numpy()
    np.testing.assert_allclose(got, st.norm.logpdf(x, eta, np.sqrt(nv)), rtol=1e-10)
    # the closed-form expectation agrees with Monte Carlo over eta ~ N(m, v)
    v = torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64)
    exact = lik.expected_log_prob(x, eta, v, None, MonteCarlo(1)).detach().numpy()
    gen = torch.Generator().manual_seed(0)
    # the base class's rule, bypassing Gaussian's closed form
    mc = Likelihood.expected_log_prob(lik, x, eta, v, None, MonteCarlo(200_000), gen)
    np.testing.assert_allclose(mc.detach().numpy(), exact, rtol=5e-3)
    gh = Likelihood.expected_log_prob(lik, x, eta, v, None, GaussHermite(3))
    np.testing.assert_allclose(gh.detach().numpy(), exact, rtol=1e-12)  # exact for quadratics


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_finite_values_and_gradients_at_extremes(name):
    """float32, eta = +-100, counts 0 and 1e5, inverse dispersion 1e-2 .. 1e8."""
    x = torch.tensor([[0.0, 1.0, 1e5, 0.0, 3.0, 1e5]])
    r = torch.tensor([1e-2, 1e8, 1e8, 1e-2, 1.0, 10])
    # a shared dispersion takes each extreme in turn
    settings = [r[i] for i in range(6)] if name == "negative_binomial_shared" else [r]
    for value in settings:
        eta = torch.tensor([[-100.0, -100.0, 100.0, 100.0, 0.0, -100.0]], requires_grad=True)
        lik = get_likelihood(name)
        lik.initialize(np.ones(6), np.ones(6))
        lik.initialize_rows(1)
        if hasattr(lik, "log_inverse_dispersion"):
            with torch.no_grad():
                # the unconstrained value: r = 1e8 maps to 5e7 through the bound
                lik.log_inverse_dispersion.copy_(torch.log(value))
        lp = lik.log_prob(x, eta, torch.zeros(1, 1))
        assert torch.isfinite(lp).all()
        lp.sum().backward()
        assert torch.isfinite(eta.grad).all()
        for p in lik.parameters():
            assert torch.isfinite(p.grad).all()


def test_softplus_log_is_accurate_across_switch():
    link = get_link("softplus")
    eta = torch.linspace(-120, 60, 2001, dtype=torch.float64)
    want = np.log(np.logaddexp(0, eta.numpy()))
    np.testing.assert_allclose(link.log(eta).numpy(), want, rtol=1e-12)
    eta32 = eta.float().requires_grad_(True)
    got = link.log(eta32)
    np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=2e-6, atol=1e-6)
    got.sum().backward()
    assert torch.isfinite(eta32.grad).all()
    # d/deta log softplus(eta) = sigmoid(eta) / softplus(eta), in float64
    e = eta.numpy()
    slope = np.exp(-np.logaddexp(0, -e) - np.log(np.logaddexp(0, e)))
    np.testing.assert_allclose(eta32.grad.double().numpy(), slope, rtol=1e-5, atol=1e-6)


def test_registry_and_errors():
    assert set(LIKELIHOODS) == {
        "gaussian",
        "poisson",
        "negative_binomial",
        "negative_binomial_shared",
        "negative_binomial_full",
        "zinb",
        "zip",
        "zt_poisson",
        "zt_negative_binomial",
    }
    for name in LIKELIHOODS:
        assert get_likelihood(name).name == name
    with pytest.raises(ValueError, match="unknown likelihood"):
        get_likelihood("zipf")
    with pytest.raises(ValueError, match="unknown link"):
        get_likelihood("poisson", "probit")
    with pytest.raises(ValueError, match="positive link"):
        get_likelihood("poisson", "identity")
    # an instance is copied, never mutated by a fit
    lik = Poisson("exp")
    assert get_likelihood(lik) is not lik


@pytest.mark.parametrize("name", ["gaussian", "poisson", "negative_binomial"])
def test_sample_has_the_model_mean_and_variance(name):
    lik = get_likelihood(name)
    p = 3
    lik.initialize(np.full(p, 2.0), np.array([0.5, 4.0, 9.0]))
    mean = np.array([[0.5, 3.0, 20.0]])
    draws = lik.sample(np.repeat(mean, 200_000, axis=0), np.random.default_rng(0))
    var = {
        "gaussian": lambda: lik.noise_variance.double().detach().numpy() + 0 * mean,
        "poisson": lambda: mean,
        "negative_binomial": lambda: (
            mean + mean**2 / lik.inverse_dispersion.double().detach().numpy()
        ),
    }[name]()
    se = np.sqrt(var / draws.shape[0])
    np.testing.assert_array_less(np.abs(draws.mean(0) - mean[0]), 5 * se[0])
    np.testing.assert_allclose(draws.var(0), var[0], rtol=0.03)
    if lik.integer_support:
        assert np.all(draws == np.round(draws)) and draws.min() >= 0
