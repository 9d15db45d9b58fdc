"""Conformance checks for a prior family: ``check_prior(name_or_family)``.

Everything is evaluated in float64 against Monte Carlo draws of the family's
own latent variables, whose log densities under ``q`` and ``g`` are written
independently of the closed forms (``log_density`` is a plain density, the KL
and moments are the analytic formulas).
"""

from __future__ import annotations

import io

import numpy as np
import torch

from ..priors import PRIORS, PriorFamily, get_prior

__all__ = ["check_prior"]

_M, _K = 4, 3
_N_DRAWS = 200_000


def _fail(name: str, what: str) -> None:
    raise AssertionError(f"prior {name!r}: {what}")


def _family(cls, seed: int) -> PriorFamily:
    """A float64 family with a data-like start and then random parameters."""
    rng = np.random.default_rng(seed)
    family = cls(_M, _K).double()
    values = rng.normal(0.0, 1.0, (_M, _K))
    family.start_prior_(values)
    family.start_(values, rng.uniform(0.5, 4.0, (_M, _K)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in family.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return family


def _close(name, what, estimate, draws_se, exact, z=5.0, atol=1e-8):
    gap = (estimate - exact).abs()
    bad = gap > z * draws_se + atol
    if bool(bad.any()):
        _fail(
            name,
            f"{what} differs from Monte Carlo by up to {float(gap.max()):.3g} "
            f"(allowed {z} standard errors, {float((z * draws_se).max()):.3g})",
        )


def _check_monte_carlo(name, family, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    latent = family.draw(_N_DRAWS, gen)
    value = latent["value"]
    if family.support == "nonnegative" and bool((value < 0).any()):
        _fail(name, "a non-negative family drew a negative value")
    ratio = family.log_density(latent, prior=False) - family.log_density(latent, prior=True)
    if not bool(torch.isfinite(ratio).all()):
        _fail(name, "log densities of its own draws are not finite")
    n = value.shape[0]
    with torch.no_grad():
        kl = family.kl_entries()
        mean, var = family.moments()
    if bool((kl < -1e-9).any()):
        _fail(name, f"KL is negative ({float(kl.min()):.3g})")
    _close(name, "KL", ratio.mean(0), ratio.std(0) / np.sqrt(n), kl)
    _close(name, "E[theta]", value.mean(0), value.std(0) / np.sqrt(n), mean)
    centred = (value - value.mean(0)) ** 2
    _close(name, "V[theta]", centred.mean(0), centred.std(0) / np.sqrt(n), var)
    # sample() draws from the same q
    draws = torch.stack([family.sample(gen) for _ in range(4000)])
    _close(name, "sample() mean", draws.mean(0), draws.std(0) / np.sqrt(4000), mean)


def _check_gradients(name, cls, seed):
    for scale in (30.0, -30.0):
        family = _family(cls, seed)
        with torch.no_grad():
            family.logits.fill_(scale)
            family.mean.mul_(abs(scale))
            family.log_prec.fill_(np.sign(scale) * 15.0)
            for p in family.prior_parameters():
                p.mul_(5.0)
        mean, var = family.moments()
        total = family.kl() + mean.sum() + var.sum()
        total.backward()
        grads = [p.grad for p in family.parameters() if p.grad is not None]
        if not bool(torch.isfinite(total)) or not all(bool(torch.isfinite(g).all()) for g in grads):
            _fail(name, f"KL, moments or gradients are not finite at extreme values ({scale})")


def _check_summaries(name, family):
    post = family.posterior()
    with torch.no_grad():
        mean, var = (t.numpy() for t in family.moments())
    if not np.allclose(post.mean, mean, rtol=1e-6, atol=1e-9):
        _fail(name, "posterior().mean differs from moments()")
    if not np.allclose(post.var, var, rtol=1e-6, atol=1e-9):
        _fail(name, "posterior().var differs from moments()")
    for what, value in (("pip", post.pip), ("lfsr", post.lfsr)):
        if np.any((value < 0) | (value > 1)) or not np.all(np.isfinite(value)):
            _fail(name, f"{what} is not in [0, 1]")
    lower, upper = post.interval(0.9)
    if np.any(lower > upper) or np.any(post.cdf(upper) < 0.95 - 1e-9):
        _fail(name, "credible intervals are inconsistent with the cdf")
    q = np.array([0.05, 0.3, 0.7, 0.95])[:, None, None]
    t = post.quantile(q)
    if np.any(post.cdf(t) < q - 1e-9) or np.any(np.diff(t, axis=0) < 0):
        _fail(name, "quantile() is not the inverse of cdf()")
    draws = post.sample(20_000, random_state=0)
    if np.any(np.abs(draws.mean(0) - post.mean) > 6 * post.sd / np.sqrt(20_000) + 1e-9):
        _fail(name, "posterior().sample() disagrees with its mean")
    below = (draws < 0).mean(0)
    if np.any(np.abs(below - post.prob_below_zero()) > 0.02):
        _fail(name, "P(theta < 0) disagrees with posterior draws")


def _check_update(name, family):
    with torch.no_grad():
        before = float(family.kl())
        family.update_prior_()
        after = float(family.kl())
    if not after <= before + 1e-9 * max(1.0, abs(before)):
        _fail(name, f"the empirical-Bayes update raised the KL ({before:.6g} -> {after:.6g})")


def _check_state(name, cls, family):
    buffer = io.BytesIO()
    torch.save(family.state_dict(), buffer)
    buffer.seek(0)
    fresh = cls(_M, _K).double()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        if not torch.equal(fresh.kl_entries(), family.kl_entries()):
            _fail(name, "KL differs after a state_dict round trip")
        if not torch.equal(fresh.moments().mean, family.moments().mean):
            _fail(name, "moments differ after a state_dict round trip")


def _check_switch_and_permute(name, family):
    with torch.no_grad():
        mean = family.moments().mean.clone()
        kl = family.kl_entries().clone()
        family.permute_(torch.tensor([2, 0, 1]))
        if not torch.allclose(family.moments().mean, mean[:, [2, 0, 1]]):
            _fail(name, "permute_ does not reorder the factors")
        if not torch.allclose(family.kl_entries(), kl[:, [2, 0, 1]]):
            _fail(name, "permute_ does not reorder the factors' priors (KL changed)")
        family.active[0] = 0.0
        moments = family.moments()
        off = (moments.mean[:, 0], moments.var[:, 0], family.sample()[:, 0])
        if any(bool(t.abs().max() > 0) for t in off):
            _fail(name, "a switched-off factor has non-zero mean, variance or draws")
        kl_all = float(family.kl())
        kl_rest = float((family.kl_entries()[:, 1:]).sum())
        if abs(kl_all - kl_rest) > 1e-9 * max(1.0, abs(kl_all)):
            _fail(name, "a switched-off factor contributes to the KL")
        post = family.posterior()
        if np.any(post.pip[:, 0] != 0) or np.any(post.mean[:, 0] != 0):
            _fail(name, "a switched-off factor has non-zero posterior summaries")


def check_prior(prior: str | type[PriorFamily], seed: int = 0) -> None:
    """Run every conformance check on a prior family; AssertionError naming the first failure.

    Checks, in float64 on a small random ``4 x 3`` family: the analytic KL is
    non-negative and equals the Monte Carlo KL of the family's own draws
    (with independently written log densities); the moments and ``sample()``
    agree with Monte Carlo; KL, moments and their gradients are finite at
    extreme parameters; the posterior summaries agree with the moments and
    each other (mean, variance, cdf, quantiles, intervals, draws, PIP and lfsr
    in [0, 1]); the empirical-Bayes update does not raise the KL; the
    ``state_dict`` round-trips through ``torch.load(weights_only=True)``; a
    switched-off factor is exactly zero; ``permute_`` reorders factors.

    Parameters
    ----------
    prior : str or PriorFamily subclass
        A name registered in :data:`spfa.priors.PRIORS`, or a family class.
    seed : int, default=0
    """
    cls = get_prior(prior) if isinstance(prior, str) else prior
    if not (isinstance(cls, type) and issubclass(cls, PriorFamily)):
        raise ValueError(f"expected a prior name in {sorted(PRIORS)} or a PriorFamily subclass")
    name = cls.name or cls.__name__
    family = _family(cls, seed)
    _check_monte_carlo(name, family, seed)
    _check_summaries(name, family)
    _check_gradients(name, cls, seed)
    _check_state(name, cls, family)
    _check_update(name, family)
    _check_switch_and_permute(name, _family(cls, seed))
