"""One likelihood per view: RNA counts beside protein levels in one model.

:class:`Views` holds a likelihood per view (:class:`spfa.views.FeatureViews`) and
is itself a :class:`Likelihood`: every elementwise method cuts the feature axis
into the views, asks each view's likelihood (with its own link and nuisance
parameters, sized to its features) and joins the answers, so that the model, the
start and the training loop need not know there are views. Size factors scale the
views whose mean is positive (the count views), each view its own (``log_s`` is
``[n, n_views]``, or ``[n, 1]`` shared by the views); the others ignore them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..links import Link
from ..views import FeatureViews
from .base import Likelihood

__all__ = ["ViewLinks", "Views"]


class ViewLinks(Link):
    """Each view's link on its own features: the composite link of a :class:`Views`
    likelihood, for the start's linearisation (the last axis is the features)."""

    name = "views"

    def __init__(self, links: list[Link], views: FeatureViews):
        self.links, self.views = links, views
        self.positive = all(link.positive for link in links)

    def _apply(self, method: str, values):
        parts = self.views.split(values)
        return self.views.join(
            [getattr(link, method)(part) for link, part in zip(self.links, parts, strict=True)]
        )

    def __call__(self, eta):
        parts = self.views.split(eta)
        return self.views.join([link(part) for link, part in zip(self.links, parts, strict=True)])

    def log(self, eta):
        return self._apply("log", eta)

    def inverse(self, y):
        return self._apply("inverse", y)

    def derivative(self, eta):
        return self._apply("derivative", eta)

    def positive_at(self, p: int) -> np.ndarray:
        return np.array([self.links[v].positive for v in self.views.of])

    def inverse_at(self, y: np.ndarray, cols: np.ndarray) -> np.ndarray:
        out = np.empty(np.shape(y), dtype=float)
        view = self.views.of[cols]
        for v, link in enumerate(self.links):
            at = view == v
            out[at] = link.inverse(y[at])
        return out

    def __repr__(self) -> str:
        return f"ViewLinks({', '.join(link.name for link in self.links)})"


class Views(Likelihood):
    """A likelihood per view of the features.

    Parameters
    ----------
    likelihoods : mapping of str to Likelihood
        Each view's likelihood, by view name, built for that view's features.
    views : FeatureViews
        Which features each view holds (its names in the order of ``likelihoods``).

    Notes
    -----
    ``data_unit`` (the optimiser's step of parameters in ``eta``'s units) is the
    geometric mean over the features of their views' units, 1 for count views; the
    start weights each view's working residual by its own variance function.
    Zero-truncated views (which fit only the non-zero entries) are not supported.
    """

    name = "views"
    integer_support = False  # each view's support is checked on its own features
    variance_from_mean = True  # each view's weights come from its own variance function

    def __init__(self, likelihoods: Mapping[str, Likelihood], views: FeatureViews):
        torch.nn.Module.__init__(self)
        if tuple(likelihoods) != views.names:
            raise ValueError(
                f"the likelihoods' views {list(likelihoods)} differ from the features' "
                f"views {list(views.names)}"
            )
        for name, lik in likelihoods.items():
            if not isinstance(lik, Likelihood) or isinstance(lik, Views):
                raise ValueError(f"view {name!r} needs one likelihood, got {lik!r}")
            if not lik.observes_zeros:
                raise ValueError(
                    f"view {name!r}: the {lik.name} likelihood fits only non-zero entries, "
                    "which a multi-view fit does not support; use its untruncated version"
                )
        self.views = views
        self.parts = torch.nn.ModuleList(likelihoods.values())
        self.data_unit = 1.0

    @property
    def link(self) -> ViewLinks:
        return ViewLinks([lik.link for lik in self.parts], self.views)

    @property
    def positive_mean(self) -> bool:
        return any(lik.positive_mean for lik in self.parts)

    @property
    def row_parameters(self) -> tuple[str, ...]:
        return tuple(
            f"parts.{v}.{name}" for v, lik in enumerate(self.parts) for name in lik.row_parameters
        )

    @property
    def sparse_rows(self) -> bool:
        return self.parts[0].sparse_rows

    @sparse_rows.setter
    def sparse_rows(self, value: bool) -> None:
        for lik in self.parts:
            lik.sparse_rows = bool(value)

    @property
    def residual_weights(self) -> bool:
        return True  # a Gaussian view's noise variance, from the start's residual

    @property
    def closed_form(self) -> bool:
        return all(lik.closed_form for lik in self.parts)

    def _log_s(self, v: int, log_s, at=None):
        """View ``v``'s log size factors from every view's: ``log_s`` is ``[n, n_views]``
        (or ``[n, 1]``, shared) on a grid, ``[m, n_views]`` (or ``[m]``) at the entries
        ``at`` of a list; None for a view whose mean they do not scale."""
        if log_s is None or not self.parts[v].positive_mean:
            return None
        if at is not None:
            return log_s[at, v] if log_s.dim() == 2 else log_s[at]
        return log_s[..., v : v + 1] if log_s.shape[-1] > 1 else log_s

    # -- set-up -------------------------------------------------------------------
    def initialize(self, feature_mean, feature_var):
        means, variances = (
            self.views.split(np.asarray(feature_mean, dtype=float)),
            (self.views.split(np.asarray(feature_var, dtype=float))),
        )
        for lik, m, v in zip(self.parts, means, variances, strict=True):
            lik.initialize(m, v)
        logs = np.log([float(lik.data_unit) for lik in self.parts])
        self.data_unit = float(np.exp(np.average(logs, weights=self.views.sizes())))

    def initialize_rows(self, n_samples):
        for lik in self.parts:
            lik.initialize_rows(n_samples)

    def variance_function(self, mu):
        parts = self.views.split(np.asarray(mu))
        return self.views.join(
            [lik.variance_function(m) for lik, m in zip(self.parts, parts, strict=True)]
        )

    # -- model --------------------------------------------------------------------
    def _each(self, method: str, x, grids, log_s, rows, cols, *extra):
        """``method`` of each view's likelihood on its features, joined: on a grid the
        last axis of ``x`` and of each of ``grids`` is cut into the views; for a list of
        entries, each view gets its own entries (re-indexed to its features)."""
        if cols is None:
            xs = self.views.split(x)
            gs = [self.views.split(g) for g in grids]
            out = [
                getattr(lik, method)(
                    xs[v], *(g[v] for g in gs), self._log_s(v, log_s), *extra, rows, None
                )
                for v, lik in enumerate(self.parts)
            ]
            return self.views.join(out)
        shape = torch.broadcast_shapes(x.shape, *(g.shape for g in grids))
        out = x.new_empty(shape)
        for v, (at, local) in enumerate(self.views.entry_views(cols)):
            part = getattr(self.parts[v], method)(
                x[..., at],
                *(g[..., at] for g in grids),
                self._log_s(v, log_s, at),
                *extra,
                None if rows is None else rows[at],
                local,
            )
            out[..., at] = part
        return out

    def log_prob(self, x, eta, log_s, rows=None, cols=None):
        return self._each("log_prob", x, (eta,), log_s, rows, cols)

    def expected_log_prob(
        self, x, eta_mean, eta_var, log_s, expectation, generator=None, rows=None, cols=None
    ):
        return self._each(
            "expected_log_prob", x, (eta_mean, eta_var), log_s, rows, cols, expectation, generator
        )

    def mean(self, eta, log_s=None):
        parts = self.views.split(eta)
        return self.views.join(
            [
                lik.mean(e, self._log_s(v, log_s))
                for v, (lik, e) in enumerate(zip(self.parts, parts, strict=True))
            ]
        )

    def log_mean(self, eta, log_s):
        raise NotImplementedError("a multi-view likelihood has no single log mean")

    def sample(self, mean, rng):
        parts = self.views.split(np.asarray(mean))
        return self.views.join(
            [lik.sample(m, rng) for lik, m in zip(self.parts, parts, strict=True)]
        )

    def fitted_attributes(self) -> dict:
        """Each view's fitted nuisance parameters: those with one row per feature on all
        ``p`` features (``(p, ...)``, NaN on the views without that parameter); others
        (scalars, per-sample ones) as ``<name>_view<v>_``, ``v`` the view's number."""
        p = self.views.n_features
        out: dict = {}
        for v, (lik, idx) in enumerate(zip(self.parts, self.views.index, strict=True)):
            for key, value in lik.fitted_attributes().items():
                value = np.asarray(value, dtype=float)
                shape = (p,) + value.shape[1:]
                per_feature = value.ndim and value.shape[0] == idx.size and "row" not in key
                if per_feature and out.get(key, np.empty(shape)).shape == shape:
                    out.setdefault(key, np.full(shape, np.nan))[idx] = value
                else:
                    out[f"{key.rstrip('_')}_view{v}_"] = value
        return out

    def extra_repr(self) -> str:
        return repr(self.views)
