"""spfa.testing.check_likelihood: every registered likelihood passes, broken ones fail."""

import itertools

import pytest
import torch

from spfa.likelihoods import (
    LIKELIHOODS,
    Gaussian,
    NegativeBinomial,
    Poisson,
    ZeroInflated,
    ZeroTruncated,
)
from spfa.special import LOG_2PI
from spfa.testing import check_likelihood


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_registered_likelihoods_pass(name):
    check_likelihood(name)


@pytest.mark.parametrize("link", ["exp", "sigmoid"])
@pytest.mark.parametrize("name", ["poisson", "negative_binomial_full", "zip", "zt_poisson"])
def test_count_likelihoods_pass_with_other_links(name, link):
    check_likelihood(name, link)


@pytest.mark.parametrize(
    "lik",
    [
        ZeroInflated(NegativeBinomial(dispersion="full", dispersion_rank=2)),
        ZeroTruncated(NegativeBinomial("exp", dispersion="shared")),
    ],
    ids=["zi-nb-full", "zt-nb-shared"],
)
def test_wrapped_instances_pass(lik):
    check_likelihood(lik)
    assert list(lik.parameters()) == []  # checked a copy


# ------------------------------------------------------------ broken likelihoods
class OffByAConstant(Poisson):
    def log_prob(self, x, eta, log_s, rows=None, cols=None):
        return super().log_prob(x, eta, log_s, rows, cols) + 0.01


class BiasedSample(NegativeBinomial):
    def sample(self, mean, rng):
        return super().sample(1.02 * mean, rng)


class WrongClosedForm(Gaussian):
    def expected_log_prob(
        self, x, eta_mean, eta_var, log_s, expectation, generator=None, rows=None, cols=None
    ):
        # forgets E[(x - eta)^2] = (x - E[eta])^2 + V[eta]
        var = self.per_feature(self.noise_variance, cols)
        return -0.5 * (LOG_2PI + torch.log(var) + (x - eta_mean) ** 2 / var)


class NaiveTruncation(Poisson):
    """Zero-truncated Poisson with log(1 - exp(-mu)), which is -inf once mu underflows."""

    observes_zeros = False

    def log_prob(self, x, eta, log_s, rows=None, cols=None):
        mu = torch.exp(self.log_mean(eta, log_s))
        return super().log_prob(x, eta, log_s, rows, cols) - torch.log(1.0 - torch.exp(-mu))

    def sample(self, mean, rng):
        return ZeroTruncated(Poisson()).sample(mean, rng)


class UnpersistedShift(Poisson):
    """A per-feature shift kept in a plain tensor attribute, outside the state_dict."""

    initialized = itertools.count()

    def initialize(self, feature_mean, feature_var):
        # a different value for each instance, as fitting would leave it
        step = 0.1 * next(self.initialized)
        self.shift = torch.full((len(feature_mean),), step, dtype=torch.float64)

    def log_prob(self, x, eta, log_s, rows=None, cols=None):
        return super().log_prob(x, eta + self.per_feature(self.shift, cols), log_s, rows, cols)

    def mean(self, eta, log_s=None):
        return super().mean(eta + self.shift, log_s)


class IgnoresColumns(Poisson):
    """A per-feature shift added without gathering it at the entries' columns."""

    def initialize(self, feature_mean, feature_var):
        self.shift = torch.nn.Parameter(torch.linspace(-0.5, 0.5, len(feature_mean)))

    def log_prob(self, x, eta, log_s, rows=None, cols=None):
        return super().log_prob(x, eta + self.shift, log_s, rows, cols)  # not per_feature

    def mean(self, eta, log_s=None):
        return super().mean(eta + self.shift, log_s)


@pytest.mark.parametrize(
    "lik, check",
    [
        (OffByAConstant(), "normalisation"),
        (BiasedSample(), "sample"),
        (WrongClosedForm(), "expected_log_prob"),
        (NaiveTruncation(), "normalisation"),
        (IgnoresColumns(), "layouts"),
    ],
    ids=["log-prob-offset", "biased-sample", "wrong-closed-form", "naive-truncation", "cols"],
)
def test_broken_likelihoods_fail(lik, check):
    with pytest.raises(AssertionError, match=rf"\[{check}\]"):
        check_likelihood(lik)


def test_state_outside_the_state_dict_fails():
    with pytest.raises(AssertionError, match=r"\[state_dict\]"):
        check_likelihood(UnpersistedShift())
