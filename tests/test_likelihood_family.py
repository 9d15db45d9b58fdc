"""ZINB / ZIP and the wrappers, NB dispersion choices, the sigmoid link and the expectation rules.

Oracles: scipy (NB pmf, numerical integration), float64 references written
from the definitions, Monte Carlo for sampling moments, planted truth for
recovery.
"""

import warnings

import numpy as np
import pytest
import scipy.integrate as si
import scipy.sparse as sp
import scipy.stats as st
import torch
from sklearn.exceptions import ConvergenceWarning

from spfa import SparseFactorAnalysis
from spfa.expectation import GaussHermite, MonteCarlo, get_expectation
from spfa.likelihoods import (
    Gaussian,
    NegativeBinomial,
    Poisson,
    ZeroInflated,
    ZeroInflatedNegativeBinomial,
    ZeroTruncated,
    get_likelihood,
)
from spfa.links import Sigmoid, get_link
from spfa.simulate import MATCHED_FIT, simulate

X = np.array([0, 0, 1, 3, 10, 100, 0, 7], dtype=float)
ETA = np.array([-30, 0.5, -3, 0, 2, 5, 8, 1], dtype=float)


def _mu(eta):
    return np.logaddexp(0.0, eta)


def _zinb(r, psi):
    lik = ZeroInflatedNegativeBinomial().double()
    lik.initialize(np.ones(len(r)), np.ones(len(r)))
    lik = lik.double()
    lik.set_inverse_dispersion(r)
    with torch.no_grad():
        lik.zero_logit.copy_(torch.as_tensor(psi, dtype=torch.float64))
    return lik


@pytest.mark.parametrize("r", [0.3, 5.0, 1e4])
@pytest.mark.parametrize("psi", [-30.0, -2.0, 0.0, 3.0, 30.0])
def test_zinb_against_reference(r, psi):
    lik = _zinb(np.full(len(X), r), np.full(len(X), psi))
    got = lik.log_prob(torch.tensor(X[None]), torch.tensor(ETA[None]), None).detach().numpy()[0]
    mu = _mu(ETA)
    nb = st.nbinom.logpmf(X, r, r / (r + mu))
    # pi 1[x = 0] + (1 - pi) NB(x), with log pi and log(1 - pi) exact in float64
    log_pi, log_keep = -np.logaddexp(0.0, -psi), -np.logaddexp(0.0, psi)
    want = np.where(X == 0, np.logaddexp(log_pi, log_keep + nb), log_keep + nb)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_zinb_finite_gradients_for_extreme_zero_logits():
    lik = ZeroInflatedNegativeBinomial()
    lik.initialize(np.ones(4), np.ones(4))
    with torch.no_grad():
        lik.zero_logit.copy_(torch.tensor([-80.0, 80.0, -80.0, 80.0]))
    eta = torch.tensor([[-100.0, -100.0, 100.0, 100.0]], requires_grad=True)
    lp = lik.log_prob(torch.tensor([[0.0, 0.0, 5.0, 0.0]]), eta, torch.zeros(1, 1))
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    assert torch.isfinite(eta.grad).all() and torch.isfinite(lik.zero_logit.grad).all()


def test_zinb_sample_moments():
    lik = _zinb(np.full(3, 2.0), np.log([0.1 / 0.9, 0.5 / 0.5, 0.8 / 0.2]))
    mean_nb = np.array([3.0, 0.5, 10.0])
    # sample() takes the ZINB mean (1 - pi) mu, as inverse_transform gives it
    keep = 1.0 - np.array([0.1, 0.5, 0.8])
    draws = lik.sample(np.broadcast_to(keep * mean_nb, (200_000, 3)), np.random.default_rng(0))
    np.testing.assert_allclose(draws.mean(0), keep * mean_nb, rtol=0.02)
    var_nb = mean_nb + mean_nb**2 / 2.0
    want_var = keep * (var_nb + mean_nb**2) - (keep * mean_nb) ** 2
    np.testing.assert_allclose(draws.var(0), want_var, rtol=0.03)
    zeros = (draws == 0).mean(0)
    np.testing.assert_allclose(zeros, (1 - keep) + keep * (2.0 / (2.0 + mean_nb)) ** 2, atol=5e-3)


@pytest.mark.parametrize("link", ["softplus", "exp"])
@pytest.mark.parametrize("psi", [-30.0, -2.0, 0.0, 3.0, 30.0])
def test_zip_against_scipy(psi, link):
    lik = get_likelihood("zip", link)
    lik.initialize(np.ones(len(X)), np.ones(len(X)))
    lik = lik.double()
    with torch.no_grad():
        lik.zero_logit.fill_(psi)
    s = np.linspace(0.5, 2.0, len(X))
    got = lik.log_prob(
        torch.tensor(X[None]), torch.tensor(ETA[None]), torch.tensor(np.log(s))[None]
    )
    mu = s * (_mu(ETA) if link == "softplus" else np.exp(ETA))
    # pi 1[x = 0] + (1 - pi) Poisson(x), the pmf from scipy's, in logs so that
    # pi near 0 or 1 keeps its digits
    log_pi, log_keep = -np.logaddexp(0.0, -psi), -np.logaddexp(0.0, psi)
    poisson = st.poisson.logpmf(X, mu)
    want = np.where(X == 0, np.logaddexp(log_pi, log_keep + poisson), log_keep + poisson)
    np.testing.assert_allclose(got.detach().numpy()[0], want, rtol=1e-9, atol=1e-12)
    mean = lik.mean(torch.tensor(ETA[None]), torch.tensor(np.log(s))[None]).detach().numpy()
    np.testing.assert_allclose(mean[0], np.exp(log_keep) * mu, rtol=1e-12)
    assert set(lik.fitted_attributes()) == {"zero_inflation_"}


def test_wrappers_accept_only_count_bases_that_observe_zeros():
    with pytest.raises(ValueError, match="zero inflation needs a count likelihood"):
        ZeroInflated(Gaussian())
    with pytest.raises(ValueError, match="zero inflation needs a count likelihood"):
        ZeroInflated(ZeroTruncated(Poisson()))
    with pytest.raises(ValueError, match="zero truncation needs"):
        ZeroTruncated(ZeroInflated(Poisson()))
    with pytest.raises(ValueError, match="wraps a Likelihood instance"):
        ZeroTruncated("poisson")
    assert ZeroInflated(Poisson()).name == "zero_inflated_poisson"
    assert ZeroTruncated(NegativeBinomial(), name="ztnb").name == "ztnb"


def test_wrapper_forwards_to_its_base():
    lik = ZeroInflated(NegativeBinomial(dispersion="full", dispersion_rank=2))
    lik.initialize(np.full(3, 2.0), np.full(3, 9.0))
    lik.initialize_rows(4)
    nb = lik.base
    assert lik.link is nb.link and lik.integer_support and lik.positive_mean
    assert lik.observes_zeros and not ZeroTruncated(nb).observes_zeros
    # per-sample parameters by their state-dict paths, reachable by getattr
    assert lik.row_parameters == ("base.dispersion_rows",)
    assert getattr(lik, lik.row_parameters[0]) is nb.dispersion_rows
    assert lik.get_parameter(lik.row_parameters[0]) is nb.dispersion_rows
    lik.sparse_rows = True
    assert nb.sparse_rows and lik.sparse_rows
    lik.sparse_rows = False
    assert not nb.sparse_rows
    # attributes the wrapper does not define are the base's
    lik.set_inverse_dispersion([1.0, 2.0, 3.0])
    r = torch.exp(nb.log_inverse_dispersion_at()).detach()[0]
    np.testing.assert_allclose(r, [1.0, 2.0, 3.0], rtol=1e-6)
    assert lik.dispersion == "full" and lik.inverse_dispersion.shape == (4, 3)
    np.testing.assert_array_equal(
        lik.variance_function(np.ones(3)), nb.variance_function(np.ones(3))
    )
    assert set(lik.fitted_attributes()) == {
        "inverse_dispersion_",
        "dispersion_",
        "dispersion_row_factors_",
        "dispersion_feature_factors_",
        "zero_inflation_",
    }
    assert set(lik.state_dict()) == {
        "zero_logit",
        "base.log_inverse_dispersion",
        "base.dispersion_features",
        "base.dispersion_rows",
    }
    with pytest.raises(AttributeError, match="no attribute 'noise_variance'"):
        lik.noise_variance  # noqa: B018


def test_registered_wrappers_state_keys():
    """The keys a migration of files saved before the wrappers has to rename."""
    keys = {}
    for name in ("zinb", "zip", "zt_poisson", "zt_negative_binomial"):
        lik = get_likelihood(name)
        lik.initialize(np.ones(2), np.ones(2))
        keys[name] = set(lik.state_dict())
    assert keys == {
        "zinb": {"zero_logit", "base.log_inverse_dispersion"},
        "zip": {"zero_logit"},
        "zt_poisson": set(),
        "zt_negative_binomial": {"base.log_inverse_dispersion"},
    }


def test_wrapper_of_full_dispersion_fits_and_transforms():
    """Per-sample parameters of a wrapped base are refitted for new rows."""
    sim = simulate("negative_binomial", n=40, p=30, pi0=(0.3, 0.7), slab_sd=(1.0, 1.0), seed=5)
    lik = ZeroInflated(NegativeBinomial(dispersion="full"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = SparseFactorAnalysis(
            2, likelihood=lik, max_iter=60, random_state=0, device="cpu"
        ).fit(sim.x)
        z = est.transform(sim.x[:7])
    assert est.dispersion_row_factors_.shape == (40, 1)
    assert est.zero_inflation_.shape == (30,) and z.shape == (7, 2)
    assert np.all(np.isfinite(z))


def _full_nb(n, p, rank=2, seed=0):
    lik = NegativeBinomial(dispersion="full", dispersion_rank=rank).double()
    lik.initialize(np.ones(p), np.ones(p))
    lik.initialize_rows(n)
    lik = lik.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lik.log_inverse_dispersion.copy_(torch.randn(p, generator=gen, dtype=torch.float64))
        lik.dispersion_rows.copy_(torch.randn(n, rank, generator=gen, dtype=torch.float64))
        lik.dispersion_features.copy_(torch.randn(p, rank, generator=gen, dtype=torch.float64))
    return lik


def test_full_dispersion_against_scipy_on_grid_and_entries():
    n, p = 5, 4
    lik = _full_nb(n, p)
    rng = np.random.default_rng(1)
    x = rng.poisson(3.0, size=(n, p)).astype(float)
    eta = rng.normal(size=(n, p))
    log_s = np.log(rng.uniform(0.5, 2.0, size=(n, 1)))
    a = lik.log_inverse_dispersion.detach().numpy()
    u = lik.dispersion_rows.detach().numpy()
    v = lik.dispersion_features.detach().numpy()
    r = np.exp(a[None] + u @ v.T)  # far below the 1e10 bound: the identity
    mu = np.exp(log_s) * _mu(eta)
    want = st.nbinom.logpmf(x, r, r / (r + mu))
    got = lik.log_prob(torch.tensor(x), torch.tensor(eta), torch.tensor(log_s))
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-9)
    # the same entries listed one by one, as a zero-truncated or sparse fit sees them
    rows, cols = np.nonzero(np.ones((n, p)))
    entries = lik.log_prob(
        torch.tensor(x[rows, cols]),
        torch.tensor(eta[rows, cols]),
        torch.tensor(log_s[rows, 0]),
        torch.as_tensor(rows),
        torch.as_tensor(cols),
    )
    np.testing.assert_allclose(entries.detach().numpy(), want[rows, cols], rtol=1e-9)


def test_shared_dispersion_is_one_value():
    lik = get_likelihood("negative_binomial_shared")
    lik.initialize(np.full(6, 2.0), np.linspace(3.0, 20.0, 6))
    assert lik.log_inverse_dispersion.dim() == 0
    assert lik.inverse_dispersion.shape == (6,)
    assert len(set(lik.inverse_dispersion.tolist())) == 1
    assert lik.fitted_attributes()["inverse_dispersion_"].shape == (6,)


def test_inverse_dispersion_bound_keeps_poisson_data_finite():
    # Poisson data drive the NB's r up without limit; the reparameterisation
    # bounds it below 1e10, where the float32 log-probability is exact
    lik = NegativeBinomial()
    lik.initialize(np.ones(3), np.ones(3))
    with torch.no_grad():
        lik.log_inverse_dispersion.fill_(1e4)  # what Adam reaches after many steps
    r = lik.inverse_dispersion.detach()
    assert torch.isfinite(r).all() and float(r.max()) <= 1e10
    lp = lik.log_prob(torch.tensor([[0.0, 2.0, 40.0]]), torch.tensor([[0.0, 1.0, 3.0]]), None)
    want = st.poisson.logpmf([0, 2, 40], _mu(np.array([0.0, 1.0, 3.0])))
    np.testing.assert_allclose(lp.detach().numpy()[0], want, rtol=1e-4)
    with pytest.raises(ValueError, match="inverse dispersions"):
        lik.set_inverse_dispersion([1.0, 2.0, 1e11])


def test_inverse_dispersion_bound_keeps_extreme_overdispersion_finite():
    """The "full" product u_i v_j can drive log r far below 0 on sparse counts: r is
    bounded above 1e-10 (no underflow to 0), so the log-probability and its gradient
    stay finite, and against scipy's NB where r is at the bound; the map is the
    identity (to 1e-7) for 1e-3 <= r <= 1e3 and round-trips through set_inverse_dispersion."""
    lik = NegativeBinomial().double()
    lik.initialize(np.ones(3), np.ones(3))
    t = torch.full((3,), -1e4, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        lik.log_inverse_dispersion.copy_(t)
    x, eta = torch.tensor([[0.0, 2.0, 40.0]]), torch.tensor([[0.0, 1.0, 3.0]])
    lp = lik.log_prob(x.double(), eta.double(), None)
    lp.sum().backward()
    r = float(lik.inverse_dispersion.detach()[0])
    assert 1e-10 <= r < 2e-10
    assert torch.isfinite(lp).all() and torch.isfinite(lik.log_inverse_dispersion.grad).all()
    mu = _mu(np.array([0.0, 1.0, 3.0]))
    want = st.nbinom.logpmf([0, 2, 40], r, r / (r + mu))
    np.testing.assert_allclose(lp.detach().numpy()[0], want, rtol=1e-6, atol=1e-6)
    for value in (1e-3, 0.5, 7.0, 1e3):
        lik.set_inverse_dispersion([value] * 3)
        got = lik.inverse_dispersion.detach().numpy()
        np.testing.assert_allclose(got, value, rtol=1e-6)
        np.testing.assert_allclose(
            lik.log_inverse_dispersion.detach().numpy(), np.log(value), atol=1e-6
        )
    with pytest.raises(ValueError, match="inverse dispersions"):
        lik.set_inverse_dispersion([1.0, 2.0, 1e-11])


def test_dispersion_choice_is_checked():
    with pytest.raises(ValueError, match="dispersion must be one of"):
        NegativeBinomial(dispersion="gene")
    with pytest.raises(ValueError, match="dispersion_rank"):
        NegativeBinomial(dispersion="full", dispersion_rank=0)


# ---------------------------------------------------------------- sigmoid link
def test_sigmoid_link_log_and_inverse():
    link = Sigmoid(scale=2.0)
    eta = torch.tensor([-200.0, -5.0, 0.0, 5.0, 60.0], dtype=torch.float64)
    want = np.log(2.0) - np.logaddexp(0.0, -eta.numpy())
    np.testing.assert_allclose(link.log(eta).numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(link(eta).numpy(), np.exp(want), rtol=1e-12)
    np.testing.assert_allclose(link.inverse(link(eta[1:4]).numpy()), eta[1:4].numpy())
    with pytest.raises(ValueError, match="bounds the mean"):
        link.inverse([0.5, 2.5])
    with pytest.raises(ValueError, match="scale"):
        Sigmoid(scale=0.0)
    assert isinstance(get_link("sigmoid"), Sigmoid)


def test_sigmoid_link_fits_proportions_with_library_sizes():
    # counts whose mean is s_i * proportion_ij: the sigmoid link's reading
    sim = simulate("poisson", n=80, p=60, pi0=(0.3, 0.7), slab_sd=(1.0, 1.0), seed=2)
    prop = sim.mean / sim.mean.sum(1, keepdims=True)
    x = np.random.default_rng(0).poisson(prop * 2000.0)
    libsize = x.sum(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = SparseFactorAnalysis(
            2, link="sigmoid", max_iter=600, random_state=0, device="cpu"
        ).fit(x, size_factors=libsize)
    fitted = est.inverse_transform(est.loadings_)
    assert fitted.max() < 1.0
    err = np.linalg.norm(fitted - prop) / np.linalg.norm(prop)
    assert err < 0.2, err
    with pytest.raises(ValueError, match="bounds the mean"):
        SparseFactorAnalysis(2, link="sigmoid", device="cpu").fit(x)  # no library sizes


# ----------------------------------------------------------- expectation rules
def test_poisson_exp_link_expected_log_prob_is_exact():
    """Under the exp link E_q[log p] is closed form: it matches numerical integration
    of the log-pmf whatever rule is passed, and has no Monte Carlo noise."""
    lik = Poisson(link="exp").double()
    x = torch.tensor([0.0, 3.0, 12.0, 40.0], dtype=torch.float64)
    m = torch.tensor([-2.0, 1.0, 2.5, 3.0], dtype=torch.float64)
    v = torch.tensor([0.3, 1.0, 2.0, 0.01], dtype=torch.float64)
    log_s = torch.tensor([0.3, -0.5, 0.0, 1.0], dtype=torch.float64)

    def integrand(e, xi, ls, mi, vi):
        lp = st.poisson.logpmf(xi, np.exp(e + ls))
        return lp * st.norm.pdf(e, mi, np.sqrt(vi))

    want = [
        si.quad(integrand, mi - 12 * np.sqrt(vi), mi + 12 * np.sqrt(vi), args=(xi, ls, mi, vi))[0]
        for xi, ls, mi, vi in zip(*(t.tolist() for t in (x, log_s, m, v)), strict=True)
    ]
    gen = torch.Generator().manual_seed(0)
    for rule in (MonteCarlo(1), GaussHermite(3)):
        got = lik.expected_log_prob(x, m, v, log_s, rule, gen).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-7)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("sized", [False, True])
@pytest.mark.parametrize("intercept", [False, True])
def test_poisson_exp_link_grid_sum_matches_the_entrywise_form(masked, sized, intercept):
    """The model sums the closed form from the factored linear predictor (no grid of
    E[eta] or V[eta]); its value and every gradient equal those of the entrywise
    closed form (itself checked against numerical integration above), summed over
    the observed entries."""
    from spfa.model import SparseFactorModel

    torch.manual_seed(0)
    n, p, k = 13, 11, 3
    lik = Poisson(link="exp")
    lik.initialize(np.ones(p), np.ones(p))
    model = SparseFactorModel(n, p, k, lik, fit_intercept=intercept).double()
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    mask = (torch.rand(n, p) > 0.3).double() if masked else None
    x = torch.poisson(torch.full((n, p), 2.0)).double() * (1.0 if mask is None else mask)
    log_s = 0.4 * torch.randn(n, 1, dtype=torch.float64) if sized else None
    params = [prm for prm in model.parameters() if prm.requires_grad]

    fused = model.elbo_terms(x, mask, log_s, GaussHermite(3), cache={}).err
    grads = torch.autograd.grad(fused, params, allow_unused=True)
    mean, var = model.eta_moments()
    entrywise = lik.expected_log_prob(x, mean, var, log_s, GaussHermite(3))
    entrywise = (entrywise if mask is None else entrywise * mask).sum()
    want = torch.autograd.grad(entrywise, params, allow_unused=True)
    torch.testing.assert_close(fused, entrywise, rtol=1e-12, atol=1e-9)
    assert sum(g is not None for g in want) >= 6  # L's and F's variational parameters
    for got, ref in zip(grads, want, strict=True):
        assert (got is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_sum_exp_product_gradient_is_the_numerical_one():
    from spfa.linear_predictor import sum_exp_product

    gen = torch.Generator().manual_seed(1)
    lhs = 0.3 * torch.randn(6, 4, generator=gen, dtype=torch.float64)
    rhs = 0.3 * torch.randn(5, 4, generator=gen, dtype=torch.float64)
    bias = 0.3 * torch.randn(5, generator=gen, dtype=torch.float64)
    mask = (torch.rand(6, 5, generator=gen) > 0.3).double()
    for b in (bias, None):
        for m in (mask, None):
            args = [t.clone().requires_grad_(True) for t in (lhs, rhs)]
            args.append(None if b is None else b.clone().requires_grad_(True))
            assert torch.autograd.gradcheck(lambda *a, m=m: sum_exp_product(*a, m), args)

    # with a column of ones in rhs (not perturbed: it is a constant) the total is read
    # from the gradient's product
    def with_ones(r):
        return torch.cat([r, torch.ones(5, 1, dtype=torch.float64)], 1)

    rhs_ones = with_ones(rhs)
    lhs_ones = torch.cat([lhs, 0.3 * torch.randn(6, 1, generator=gen, dtype=torch.float64)], 1)
    for m in (mask, None):
        args = [t.clone().requires_grad_(True) for t in (lhs_ones, rhs)]
        assert torch.autograd.gradcheck(
            lambda a, r, m=m: sum_exp_product(a, with_ones(r), None, m, ones=4), args
        )
        args = [args[0], with_ones(args[1])]
        value = sum_exp_product(*args, None, m, ones=4)
        want = (torch.exp(lhs_ones @ rhs_ones.T) * (1.0 if m is None else m)).sum()
        torch.testing.assert_close(value, want, rtol=1e-12, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(sum_exp_product(*args, None, m, ones=4), want)
    # a wrong index is a wrong total: the ones column is what the total is read from
    args = [t.clone().requires_grad_(True) for t in (lhs_ones, rhs_ones)]
    assert not torch.allclose(sum_exp_product(*args, ones=0), sum_exp_product(*args))


def test_sum_times_mean_from_the_transposed_data_has_the_same_gradients():
    from spfa.linear_predictor import LinearPredictor, _SumTimesMean

    gen = torch.Generator().manual_seed(3)

    def draw(*shape, normal=True):
        sample = torch.randn if normal else torch.rand
        return sample(*shape, generator=gen, dtype=torch.float64)

    x = torch.poisson(2.0 * draw(7, 5, normal=False))
    ml, vl, mf, vf, mb = draw(7, 3), draw(7, 3, normal=False), draw(5, 3), draw(5, 3), draw(5)
    grads = []
    for xt in (None, x.T.contiguous()):
        params = [t.clone().requires_grad_(True) for t in (ml, mf, mb)]
        eta = LinearPredictor(params[0], vl, params[1], vf.abs(), params[2], torch.zeros(5))
        value = eta.sum_times_mean(x, x.sum(0), xt)
        torch.testing.assert_close(value, (x * (params[0] @ params[1].T + params[2])).sum())
        grads.append(torch.autograd.grad(value, params))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    args = [x, x.T.contiguous(), ml.clone().requires_grad_(True), mf.clone().requires_grad_(True)]
    assert torch.autograd.gradcheck(_SumTimesMean.apply, args)


def test_sum_exp_product_reused_memory_is_never_a_wrong_gradient():
    """A second product into the same memory before the first's backward pass makes that
    pass raise; in turn (forward, backward, forward, ...) the gradients are the fresh ones."""
    from spfa.linear_predictor import sum_exp_product

    gen = torch.Generator().manual_seed(2)
    lhs = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    rhs = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    out = torch.empty(6, 5, dtype=torch.float64)
    first = sum_exp_product(lhs, rhs, out=out)
    sum_exp_product(lhs, 2 * rhs, out=out)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()
    for scale in (1.0, 2.0):
        want = torch.autograd.grad(sum_exp_product(lhs, scale * rhs), (lhs, rhs))
        got = torch.autograd.grad(sum_exp_product(lhs, scale * rhs, out=out), (lhs, rhs))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_gauss_hermite_matches_numerical_integration():
    lik = Poisson().double()
    x = torch.tensor([0.0, 3.0, 12.0], dtype=torch.float64)
    m = torch.tensor([-2.0, 1.0, 2.5], dtype=torch.float64)
    v = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)

    def integrand(e, xi, mi, vi):
        lp = lik.log_prob(torch.tensor(xi), torch.tensor(e, dtype=torch.float64), None).item()
        return lp * st.norm.pdf(e, mi, np.sqrt(vi))

    want = [
        si.quad(integrand, mi - 12 * np.sqrt(vi), mi + 12 * np.sqrt(vi), args=(xi, mi, vi))[0]
        for xi, mi, vi in zip(x.tolist(), m.tolist(), v.tolist(), strict=True)
    ]
    gh = lik.expected_log_prob(x, m, v, None, GaussHermite(20)).numpy()
    np.testing.assert_allclose(gh, want, rtol=1e-6)
    gh8 = lik.expected_log_prob(x, m, v, None, GaussHermite(8)).numpy()
    np.testing.assert_allclose(gh8, want, rtol=1e-3)
    gen = torch.Generator().manual_seed(0)
    mc = lik.expected_log_prob(x, m, v, None, MonteCarlo(400_000), gen).numpy()
    np.testing.assert_allclose(mc, want, rtol=5e-3)
    assert get_expectation("quadrature", 5).deterministic
    with pytest.raises(ValueError, match="unknown expectation"):
        get_expectation("laplace", 5)


def test_quadrature_fit_is_deterministic_and_matches_mc(counts_design):
    sim = counts_design
    fits = {}
    for rule, kw in (("quadrature", {"n_quadrature_nodes": 5}), ("mc", {})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est = SparseFactorAnalysis(
                2, expectation=rule, max_iter=400, random_state=0, device="cpu", **kw
            ).fit(sim.x)
        fits[rule] = est.inverse_transform(est.loadings_)
    again = SparseFactorAnalysis(
        2, expectation="quadrature", n_quadrature_nodes=5, max_iter=400, random_state=7
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        again.fit(sim.x)
    # no random numbers in the objective: only the seed of the start could differ,
    # and spfa's start is deterministic
    np.testing.assert_allclose(again.inverse_transform(again.loadings_), fits["quadrature"])
    err = {k: np.linalg.norm(v - sim.mean) / np.linalg.norm(sim.mean) for k, v in fits.items()}
    assert abs(err["quadrature"] - err["mc"]) < 0.05, err
    with pytest.raises(ValueError, match="expectation"):
        SparseFactorAnalysis(2, expectation="vb").fit(sim.x)


@pytest.fixture(scope="module")
def counts_design():
    return simulate("poisson", n=80, p=60, pi0=(0.3, 0.6), slab_sd=(1.0, 1.5), seed=4)


# ------------------------------------------------------ zero-truncated fitting
def test_zero_truncated_fit_sees_only_the_non_zeros(counts_design, monkeypatch):
    x = sp.csr_matrix(counts_design.x)
    seen = {"entries": 0, "values": np.inf}
    original = ZeroTruncated.log_prob

    # what the likelihood is evaluated at, whatever the estimator's internals
    def spy(self, x, *args, **kwargs):
        seen["entries"] = max(seen["entries"], x.numel())
        seen["values"] = min(seen["values"], x.min().item())
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(ZeroTruncated, "log_prob", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = SparseFactorAnalysis(
            2, likelihood="zt_poisson", max_iter=300, random_state=0, device="cpu"
        ).fit(x)
    assert seen["entries"] == x.nnz and seen["values"] >= 1
    assert np.isfinite(est.elbo_) and est.score(x[:10]) < 0
    with pytest.raises(ValueError, match="no observed non-zero"):
        SparseFactorAnalysis(2, likelihood="zt_poisson").fit(np.zeros((5, 4)))


# --------------------------------------------------------------------- recovery
def _expression_error(est, sim):
    eta = torch.as_tensor(est.loadings_ @ est.components_ + est.intercept_)
    mu = torch.nn.functional.softplus(eta).numpy() * sim.size_factors[:, None]
    return np.linalg.norm(mu - sim.mean) / np.linalg.norm(sim.mean)


def _fit_error(sim, likelihood, x=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = SparseFactorAnalysis(
            3, likelihood=likelihood, random_state=0, device="cpu", **MATCHED_FIT
        )
        est.fit(sim.x if x is None else x, size_factors=sim.size_factors)
    return _expression_error(est, sim), est


def _design(seed, **kw):
    intercept = np.random.default_rng(100 + seed).normal(1.0, 1.0, 300)
    return simulate(
        n=200,
        p=300,
        pi0=(0.5, 0.8, 0.9),
        slab_sd=(0.6, 1.0, 1.5),
        intercept=intercept,
        size_factors="random",
        seed=seed,
        **kw,
    )


@pytest.mark.slow
def test_zinb_recovers_expression_and_zero_inflation_better_than_nb():
    sim = _design(11, likelihood="zinb", inverse_dispersion=5.0, zero_inflation=0.3)
    err_zinb, est = _fit_error(sim, "zinb")
    err_nb, _ = _fit_error(sim, "negative_binomial")
    assert err_zinb < 0.7 * err_nb, (err_zinb, err_nb)
    assert abs(np.median(est.zero_inflation_) - 0.3) < 0.05


@pytest.mark.slow
def test_full_dispersion_recovers_groups_and_beats_feature_dispersion():
    r = np.where(np.arange(200) < 100, 1.0, 50.0)[:, None]
    sim = _design(12, likelihood="negative_binomial", inverse_dispersion=r)
    err_full, est = _fit_error(sim, "negative_binomial_full")
    err_nb, _ = _fit_error(sim, "negative_binomial")
    assert err_full < err_nb, (err_full, err_nb)
    log_r = np.log(est.inverse_dispersion_) + est.dispersion_row_factors_ @ (
        est.dispersion_feature_factors_.T
    )
    low, high = np.median(log_r[:100]), np.median(log_r[100:])
    # r = 1 is pinned; at r = 50 these means are all but Poisson, so the data bound r from
    # below only (training on after pruning takes it to ~650, at a higher ELBO)
    assert abs(low - 0.0) < 0.7 and high > np.log(50.0) - 0.7, (low, high)


@pytest.mark.slow
@pytest.mark.parametrize("full", ["poisson", "negative_binomial"])
def test_zero_truncated_fit_of_non_zeros_is_close_to_full_fit(full):
    sim = _design(13, likelihood=full)
    err_full, _ = _fit_error(sim, full)
    err_zt, _ = _fit_error(sim, "zt_" + full, x=sp.csr_matrix(sim.x))
    # the non-zeros alone lose the information in which entries are zero
    assert err_zt < 1.8 * err_full and err_zt < 0.2, (err_zt, err_full)
