"""Special functions of the links, likelihoods and priors, stable in float32 and float64.

Every function here is elementwise, takes and returns tensors of any shape,
and is finite with finite gradients wherever its docstring says it is defined:
the branches of each are fed only inputs where they are accurate, so that
``torch.where`` never selects (or back-propagates through) an ``inf`` or NaN.

* :func:`softplus`, :func:`log_softplus` -- ``log(1 + e^x)`` and its log;
* :func:`log1mexp_from_log` -- ``log(1 - e^{-a})`` from ``log a``;
* :func:`stirling_remainder`, :func:`lgamma_ratio` -- ``lgamma`` differences
  without cancellation;
* :func:`normal_logpdf` -- the normal log density;
* :func:`truncated_normal_moments`, :func:`truncated_normal_draw` -- the normal
  truncated to ``(0, inf)`` (point-exponential posteriors), in float64, with the
  Mills ratio's asymptotic series far in the tail;
* :data:`LOG_2PI` -- ``log(2 pi)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy import special as scipy_special

__all__ = [
    "LOG_2PI",
    "softplus",
    "log_softplus",
    "log1mexp_from_log",
    "stirling_remainder",
    "lgamma_ratio",
    "normal_logpdf",
    "truncated_normal_moments",
    "truncated_normal_draw",
]

LOG_2PI = math.log(2.0 * math.pi)
"""``log(2 pi)``."""

_HALF_LOG_2PI = 0.5 * LOG_2PI

# softplus(x) = x above this (torch's default threshold, 20, is 2e-9 off; 40 is exact)
_SOFTPLUS_LINEAR = 40.0
# below this, log(softplus(x)) = x - e^x / 2 + O(e^{2x}) with e^x < 5e-18: x to rounding
_LOG_SOFTPLUS_SWITCH = -40.0

# log(1 - e^{-a}) = log(a) - a/2 + O(a^2): below log a = -20 the branch is exact in float64
_LOG1MEXP_TINY = -20.0
# the switch between log(-expm1(-a)) and log1p(-exp(-a)) is at a = log 2 (Maechler 2012)
_LOG_LOG_2 = math.log(math.log(2.0))

# lgamma(z) is taken from the Stirling series at and above this argument
_STIRLING_MIN = 8.0


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(x))``, exact to rounding for every finite ``x``.

    Parameters
    ----------
    x : Tensor of shape (...)

    Returns
    -------
    Tensor of shape (...)
        Positive (it underflows to 0 below ``x ~ -745`` in float64).
    """
    return F.softplus(x, threshold=_SOFTPLUS_LINEAR)


def log_softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(log(1 + exp(x)))``, finite with finite gradients for every finite ``x``.

    ``x`` below ``-40`` is returned as is (the limit ``log softplus(x) -> x``,
    exact there to float64 rounding); the other branch only sees ``x >= -40``,
    so neither produces the ``log(0)`` that ``torch.where`` would turn into
    NaN gradients. Five elementwise operations: this sits in the innermost
    loop of every count fit.

    Parameters
    ----------
    x : Tensor of shape (...)

    Returns
    -------
    Tensor of shape (...)
    """
    inner = torch.log(softplus(torch.clamp(x, min=_LOG_SOFTPLUS_SWITCH)))
    return torch.where(x < _LOG_SOFTPLUS_SWITCH, x, inner)


def log1mexp_from_log(log_a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(-a))`` for ``a > 0`` given ``log a``, stable for every ``a``.

    Used for ``log(1 - p(0))`` of a count model with ``log p(0) = -a``. Three
    branches (Maechler 2012), each fed only the inputs where it is accurate:

    * ``log a - a / 2`` for ``log a < -20`` (where ``a`` itself may underflow);
    * ``log(-expm1(-a))`` for ``a <= log 2``;
    * ``log1p(-exp(-a))`` above.

    Parameters
    ----------
    log_a : Tensor of shape (...)
        ``log a``, any finite value.

    Returns
    -------
    Tensor of shape (...)
        Negative, tending to ``log_a`` as ``log_a -> -inf`` and to 0 as
        ``log_a -> inf``.
    """
    tiny = log_a < _LOG1MEXP_TINY
    small = log_a < _LOG_LOG_2
    log_a_tiny = torch.clamp(log_a, max=_LOG1MEXP_TINY)
    a_mid = torch.exp(torch.clamp(log_a, min=_LOG1MEXP_TINY, max=_LOG_LOG_2))
    a_big = torch.exp(torch.clamp(log_a, min=_LOG_LOG_2))
    return torch.where(
        tiny,
        log_a_tiny - 0.5 * torch.exp(log_a_tiny),
        torch.where(small, torch.log(-torch.expm1(-a_mid)), torch.log1p(-torch.exp(-a_big))),
    )


def stirling_remainder(z: torch.Tensor) -> torch.Tensor:
    """``lgamma(z) - [(z - 1/2) log z - z + log(2 pi) / 2]`` for ``z > 0``.

    The series ``1/(12 z) - 1/(360 z^3) + 1/(1260 z^5)`` at and above
    ``z = 8`` (error below 1e-10), the difference itself below.

    Parameters
    ----------
    z : Tensor of shape (...)
        Positive.

    Returns
    -------
    Tensor of shape (...)
        Positive, ``~ 1 / (12 z)`` for large ``z``.
    """
    zs = torch.clamp(z, max=_STIRLING_MIN)
    direct = torch.lgamma(zs) - ((zs - 0.5) * torch.log(zs) - zs + _HALF_LOG_2PI)
    zl = torch.clamp(z, min=_STIRLING_MIN)
    inv = 1.0 / zl
    inv2 = inv * inv
    series = inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 / 1260.0))
    return torch.where(z < _STIRLING_MIN, direct, series)


def lgamma_ratio(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``lgamma(x + r) - lgamma(r)`` without cancellation when ``r >> x``.

    Written as ``x log(x + r) + (r - 1/2) log1p(x / r) - x`` plus the
    difference of Stirling remainders (:func:`stirling_remainder`), every term
    of which is ``O(x)`` rather than ``O(r log r)``; exactly zero at ``x = 0``.

    Parameters
    ----------
    x : Tensor of shape (...)
        Non-negative.
    r : Tensor, broadcastable with ``x``
        Positive.

    Returns
    -------
    Tensor of the broadcast shape
    """
    return (
        x * torch.log(x + r)
        + (r - 0.5) * torch.log1p(x / r)
        - x
        + stirling_remainder(x + r)
        - stirling_remainder(r)
    )


def normal_logpdf(x: torch.Tensor, mean, log_sd) -> torch.Tensor:
    """``log N(x; mean, exp(log_sd)^2)``, elementwise (broadcasting)."""
    return -0.5 * ((x - mean) * torch.exp(-log_sd)) ** 2 - log_sd - _HALF_LOG_2PI


# -- the normal truncated to (0, inf): point-exponential posteriors ----------------
_SERIES_BELOW = -20.0
_LOG_CDF_AT_SERIES = float(scipy_special.log_ndtr(_SERIES_BELOW))
# asymptotic series of t m(-t) and of v(-t) in u = 1/t^2 (Mills ratio expansion)
_M_SERIES = (1.0, -2.0, 10.0, -74.0, 706.0)
_V_SERIES = (0.0, 1.0, -6.0, 50.0, -518.0, 6354.0)


def _poly(u: torch.Tensor, coefs) -> torch.Tensor:
    out = torch.zeros_like(u)
    for c in reversed(coefs):
        out = out * u + c
    return out


def truncated_normal_moments(
    z: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised moments of ``N(z, 1)`` truncated to ``(0, inf)``, in float64.

    Parameters
    ----------
    z : Tensor of shape (...)
        ``mu / s``.

    Returns
    -------
    m : Tensor
        ``E+[theta] / s = z + r(z)`` with ``r(z) = phi(z) / Phi(z)``.
    v : Tensor
        ``V+[theta] / s^2 = 1 - r(z) m(z)``.
    h : Tensor
        ``log Phi(z) - z r(z) / 2``: the entropy is ``log(sqrt(2 pi e) s) + h``.

    Notes
    -----
    ``r`` comes from ``log_ndtr``, accurate for every ``z`` in float64. Below
    ``z = -20`` (``t = -z``, ``u = 1/t^2``), ``m`` and ``v`` are the
    asymptotic series of the Mills ratio (relative error below 1e-8 there),
    and ``h = (log Phi(z) + t^2/2) + t m / 2``, which avoids the cancellation
    of two terms of size ``t^2 / 2``. Every output is finite with finite
    gradients for every finite ``z``.
    """
    dtype = z.dtype
    z = z.double()
    log_cdf = torch.special.log_ndtr(z)
    series = z <= _SERIES_BELOW
    zd = torch.clamp(z, min=_SERIES_BELOW)  # the direct branch sees z > -20 only
    log_cdf_d = torch.where(series, torch.full_like(z, _LOG_CDF_AT_SERIES), log_cdf)
    r = torch.exp(-0.5 * zd**2 - _HALF_LOG_2PI - log_cdf_d)
    m_direct = zd + r
    t = torch.clamp(-z, min=-_SERIES_BELOW)  # the series sees t >= 20 only
    u = 1.0 / t**2
    m_series = _poly(u, _M_SERIES) / t
    m = torch.where(series, m_series, m_direct)
    v = torch.where(series, _poly(u, _V_SERIES), 1.0 - r * m_direct)
    h = torch.where(series, log_cdf + 0.5 * t**2 + 0.5 * t * m_series, log_cdf - 0.5 * zd * r)
    return m.to(dtype), v.to(dtype), h.to(dtype)


def truncated_normal_draw(loc: torch.Tensor, scale: torch.Tensor, uniform: torch.Tensor):
    """Draws of ``N+(loc, scale^2)`` by inversion of the upper tail (float64 inside).

    ``theta = loc - scale Phi^{-1}(U Phi(z))``; far in the tail (``z < -30``),
    where ``Phi(z)`` underflows, the truncated normal is the exponential with
    rate ``-z / scale`` to relative order ``1/z^2``.
    """
    dtype = loc.dtype
    loc, scale, uniform = loc.double(), scale.double(), uniform.double()
    z = loc / scale
    tail = z < -30.0
    log_p = torch.log(uniform) + torch.special.log_ndtr(torch.clamp(z, min=-30.0))
    direct = loc - scale * torch.special.ndtri(torch.exp(log_p))
    expo = -scale * torch.log(uniform) / torch.clamp(-z, min=30.0)
    return torch.clamp(torch.where(tail, expo, direct), min=0.0).to(dtype)
