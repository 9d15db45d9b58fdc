"""spfa.testing.check_prior: every registered family conforms, and a broken one is caught."""

import pytest
import torch

from spfa.priors import PRIORS, NormalMixture, PointNormal
from spfa.testing import check_prior


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_registered_priors_conform(name):
    check_prior(name)


class _KLOff(PointNormal):
    name = "kl_off"

    def _kl(self, *params):
        return 1.02 * super()._kl(*params)


class _VarianceOff(NormalMixture):
    name = "variance_off"

    def _moments(self, *params):
        mean, var = super()._moments(*params)
        return mean, 1.05 * var


class _UpdateOff(PointNormal):
    name = "update_off"

    @torch.no_grad()
    def update_prior_(self):
        self.prior_log_prec.add_(1.0)


@pytest.mark.parametrize(
    "family, message",
    [(_KLOff, "KL differs"), (_VarianceOff, "V\\[theta\\]"), (_UpdateOff, "raised the KL")],
)
def test_check_prior_catches_a_broken_family(family, message):
    with pytest.raises(AssertionError, match=message):
        check_prior(family)


def test_check_prior_rejects_what_is_not_a_family():
    with pytest.raises(ValueError, match="unknown prior"):
        check_prior("horseshoe")
    with pytest.raises(ValueError, match="PriorFamily"):
        check_prior(int)
