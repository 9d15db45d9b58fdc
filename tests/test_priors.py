"""Analytic KLs and moments against Monte Carlo (float64)."""

import numpy as np
import pytest
import torch
from scipy import stats

from spfa.likelihoods import Poisson
from spfa.model import SparseFactorModel
from spfa.priors import NormalEffect, PointNormal, get_prior, normal_kl, point_normal_kl

CASES = [
    # alpha-logit, mu, log nu, prior logit, prior log tau
    (2.0, 0.7, 1.0, -1.0, 0.5),
    (-3.0, -2.0, -0.5, 2.0, -1.0),
    (0.0, 0.0, 3.0, 0.0, 0.0),
    (5.0, 1.5, 2.0, -4.0, 1.5),
]


@pytest.mark.parametrize("case", CASES)
def test_point_normal_kl_against_monte_carlo(case):
    z, mu, log_nu, w, log_tau = case
    t = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    kl = point_normal_kl(
        t(z), t(mu), t(log_nu), torch.tensor([w]).double(), torch.tensor([log_tau]).double()
    ).item()
    # KL = E_q[log dq/dp] with densities w.r.t. delta_0 + Lebesgue
    rng = np.random.default_rng(1)
    m = 400_000
    alpha, pi = 1 / (1 + np.exp(-z)), 1 / (1 + np.exp(-w))
    sd_q, sd_p = np.exp(-0.5 * log_nu), np.exp(-0.5 * log_tau)
    slab = rng.uniform(size=m) < alpha
    v = rng.normal(mu, sd_q, size=m)
    log_ratio = np.where(
        slab,
        np.log(alpha) + stats.norm.logpdf(v, mu, sd_q) - np.log(pi) - stats.norm.logpdf(v, 0, sd_p),
        np.log1p(-alpha) - np.log1p(-pi),
    )
    se = log_ratio.std() / np.sqrt(m)
    assert abs(log_ratio.mean() - kl) < 4 * se + 1e-12


def test_point_normal_kl_is_finite_at_extreme_logits():
    for z in [-200.0, 200.0]:
        t = torch.tensor([[z]], requires_grad=True)
        kl = point_normal_kl(t, torch.ones(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.zeros(1))
        kl.sum().backward()
        assert torch.isfinite(kl).all() and torch.isfinite(t.grad).all()


def test_normal_kl_against_torch():
    m, lv = torch.tensor([0.3, -2.0]), torch.tensor([0.1, -3.0])
    pm, plp = torch.tensor(0.5), torch.tensor(1.2)
    want = torch.distributions.kl_divergence(
        torch.distributions.Normal(m, torch.exp(0.5 * lv)),
        torch.distributions.Normal(pm, torch.exp(-0.5 * plp)),
    )
    torch.testing.assert_close(normal_kl(m, lv, pm, plp), want)


def _random_point_normal(m, k, seed):
    gen = torch.Generator().manual_seed(seed)
    pn = PointNormal(m, k).double()
    with torch.no_grad():
        for p in pn.variational_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return pn


def _sample(pn, n_draws, gen):
    alpha = pn.pip.detach()
    slab = torch.rand((n_draws,) + alpha.shape, generator=gen, dtype=torch.float64) < alpha
    sd = torch.exp(-0.5 * pn.log_prec.detach())
    v = pn.mean.detach() + sd * torch.randn(slab.shape, generator=gen, dtype=torch.float64)
    return torch.where(slab, v, torch.zeros_like(v))


def test_point_normal_moments_against_monte_carlo():
    pn = _random_point_normal(4, 3, 0)
    draws = _sample(pn, 400_000, torch.Generator().manual_seed(1))
    mean, var = pn.moments()
    torch.testing.assert_close(draws.mean(0), mean.detach(), atol=0.01, rtol=0.01)
    torch.testing.assert_close(draws.var(0), var.detach(), atol=0.02, rtol=0.02)


def test_eta_moments_against_monte_carlo():
    """E[eta] and V[eta] of eta = L F^T + b under the factorised q."""
    n, p, k = 3, 4, 2
    lik = Poisson()
    model = SparseFactorModel(n, p, k, lik, fit_intercept=True).double()
    model.loadings = _random_point_normal(n, k, 2)
    model.factors = _random_point_normal(p, k, 3)
    with torch.no_grad():
        model.intercept.mean.copy_(torch.linspace(-1, 1, p))
        model.intercept.log_var.fill_(-1.0)
    gen = torch.Generator().manual_seed(4)
    d = 200_000
    L, F = _sample(model.loadings, d, gen), _sample(model.factors, d, gen)
    b = model.intercept.mean.detach() + torch.exp(
        0.5 * model.intercept.log_var.detach()
    ) * torch.randn(d, 1, p, generator=gen, dtype=torch.float64)
    eta = L @ F.transpose(1, 2) + b
    mean, var = model.eta_moments()
    torch.testing.assert_close(eta.mean(0), mean.detach(), atol=0.03, rtol=0.02)
    torch.testing.assert_close(eta.var(0), var.detach(), atol=0.05, rtol=0.03)


def test_normal_effect_moments():
    ne = NormalEffect(3)
    with torch.no_grad():
        ne.log_var.fill_(np.log(0.25))
    assert torch.allclose(ne.moments().var, torch.full((3,), 0.25))


@pytest.mark.parametrize("z", [-1e4, -300.0, -40.0, -20.0001, -19.999, -5.0, 0.0, 0.5, 30.0])
def test_truncated_normal_moments_against_mpmath(z):
    """m = z + phi/Phi, v = 1 - r m, h = log Phi - z r / 2 of N(z, 1) truncated to (0, inf)."""
    import mpmath as mp

    from spfa.special import truncated_normal_moments

    mp.mp.dps = 50
    cdf, r = mp.ncdf(z), mp.npdf(z) / mp.ncdf(z)
    m_ref, v_ref, h_ref = z + r, 1 - r * (z + r), mp.log(cdf) - z * r / 2
    m, v, h = (float(t) for t in truncated_normal_moments(torch.tensor([z], dtype=torch.float64)))
    assert m == pytest.approx(float(m_ref), rel=1e-7)
    assert v == pytest.approx(float(v_ref), rel=1e-6)
    assert h == pytest.approx(float(h_ref), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("name", ["point_normal", "point_exponential"])
def test_spike_update_is_finite_where_every_pip_rounds_to_one_or_zero(name):
    """The empirical-Bayes pi = mean PIP, taken from the logits: finite (and right) where
    sigmoid(logits) is exactly 1 or 0 in float32 everywhere in a factor."""
    family = get_prior(name)(50, 3)
    with torch.no_grad():
        family.logits.copy_(torch.tensor([40.0, -40.0, 0.0]).repeat(50, 1))
    family.update_prior_()
    logit = family.prior_logit.detach().double().numpy()
    assert np.isfinite(logit).all()
    np.testing.assert_allclose(logit, [40.0, -40.0, 0.0], atol=1e-4)


def test_point_normal_posterior_start_is_the_normal_means_posterior():
    """New rows start at the exact posterior of theta given v ~ N(theta, 1/P) under the
    current point-normal prior (scipy oracle: the marginal densities of v)."""
    family = PointNormal(4, 2)
    pi, tau = np.array([0.3, 0.8]), np.array([0.5, 4.0])
    with torch.no_grad():
        family.prior_logit.copy_(torch.as_tensor(np.log(pi / (1 - pi))))
        family.prior_log_prec.copy_(torch.as_tensor(np.log(tau)))
    v = np.array([[0.0, 0.1], [1.5, -0.7], [-3.0, 2.0], [0.4, 0.0]])
    prec = np.array([[2.0, 9.0], [2.0, 9.0], [0.5, 30.0], [0.0, 1.0]])
    family.start_posterior_(v, prec)
    post = family.posterior()
    informed = prec > 0
    p_safe = np.where(informed, prec, 1.0)
    slab = pi * stats.norm.pdf(v, 0.0, np.sqrt(1 / tau + 1 / p_safe))
    spike = (1 - pi) * stats.norm.pdf(v, 0.0, np.sqrt(1 / p_safe))
    want_pip = np.where(informed, slab / (slab + spike), pi)
    np.testing.assert_allclose(post.pip, want_pip, rtol=1e-5)
    np.testing.assert_allclose(post.slab_mean, prec * v / (prec + tau), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(post.slab_sd, 1 / np.sqrt(prec + tau), rtol=1e-5)


def test_fixed_globals_gives_the_same_terms_and_gradients():
    """Fitting rows with the factors' moments and KL cached gives the terms and the
    loadings' gradients of the uncached model."""
    torch.manual_seed(0)
    lik = Poisson(link="exp")
    lik.initialize(np.ones(7), np.ones(7))
    model = SparseFactorModel(6, 7, 2, lik).double()
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    x = torch.poisson(torch.full((6, 7), 2.0)).double()

    def terms_and_grad():
        model.zero_grad()
        terms = model.elbo_terms(x, None, None, None)
        terms.elbo.backward()
        return terms.stacked(), model.loadings.mean.grad.clone()

    want = terms_and_grad()
    with model.fixed_globals():
        with model.fixed_globals():  # nested: the outer cache stays
            pass
        got = terms_and_grad()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the entries path (a zero-truncated fit's non-zeros) gathers the cached moments
    rows, cols = torch.nonzero(x, as_tuple=True)
    want = model.eta_moments(rows, cols)
    with model.fixed_globals():
        got = model.eta_moments(rows, cols)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["point_normal", "normal_mixture"])
def test_flip_negates_entries_and_keeps_the_kl(name):
    """A sign flip of some factors negates their entries' moments (odd ones) and leaves
    the KL and second moments as they were: the symmetry the sign convention rests on."""
    torch.manual_seed(0)
    family = get_prior(name)(7, 3).double()
    with torch.no_grad():
        for prm in family.parameters():
            prm.normal_()
    before = family.moments()
    kl = family.kl().clone()
    family.flip_(torch.tensor([-1.0, 1.0, -1.0]))
    after = family.moments()
    sign = torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(after.mean, before.mean * sign)
    torch.testing.assert_close(after.var, before.var)
    torch.testing.assert_close(family.kl(), kl)


def test_a_family_without_the_symmetry_refuses_to_flip():
    family = get_prior("point_exponential")(4, 2)
    assert not family.sign_symmetric
    with pytest.raises(ValueError, match="not symmetric"):
        family.flip_(torch.tensor([-1.0, 1.0]))


def test_point_normal_gradients_against_finite_differences():
    """The written-out gradients of the KL and the moments, by torch.autograd.gradcheck
    (central differences in float64), at ordinary and large logits."""
    from spfa.priors import point_normal_moments

    gen = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        x = scale * torch.randn(*shape, generator=gen, dtype=torch.float64)
        return x.requires_grad_()

    for logit_scale in (1.0, 8.0):
        logits, mean, log_prec = leaf(6, 3, scale=logit_scale), leaf(6, 3), leaf(6, 3)
        prior_logit, prior_log_prec = leaf(3), leaf(3)
        assert torch.autograd.gradcheck(
            point_normal_kl, (logits, mean, log_prec, prior_logit, prior_log_prec)
        )
        assert torch.autograd.gradcheck(point_normal_moments, (logits, mean, log_prec))


def test_point_normal_gradients_are_finite_at_extreme_logits():
    from spfa.priors import point_normal_moments

    logits = torch.tensor([[-200.0, -30.0, 0.0, 30.0, 200.0]], requires_grad=True)
    mean = torch.ones(1, 5, requires_grad=True)
    log_prec = torch.zeros(1, 5, requires_grad=True)
    prior = torch.zeros(5, requires_grad=True), torch.zeros(5, requires_grad=True)
    m, v = point_normal_moments(logits, mean, log_prec)
    total = point_normal_kl(logits, mean, log_prec, *prior).sum() + m.sum() + v.sum()
    total.backward()
    for p in (logits, mean, log_prec, *prior):
        assert torch.isfinite(p.grad).all()
