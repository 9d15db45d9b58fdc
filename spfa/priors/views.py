"""A prior per view and factor on the factors of a multi-view fit.

:class:`ViewFamily` puts one family (any of :data:`spfa.priors.PRIORS`) on each
view's rows of the factor matrix ``F``, so that every factor's prior -- its
inclusion probability and scale under the point families -- is learned per view:
a factor can be dense in the RNA and absent (its prior's inclusion near 0, or
pruned to the point mass) in the protein. The entries' ``q`` is the family's own.
A factor is switched off in every view at once (``active`` is shared).
"""

from __future__ import annotations

import numpy as np
import torch

from ..views import FeatureViews
from .base import Moments, PriorFamily

__all__ = ["ViewFamily"]


class ViewFamily(PriorFamily):
    """``family`` on each view's features, with its own prior per view and factor.

    Parameters
    ----------
    family : PriorFamily subclass
    views : FeatureViews
        The ``m`` rows (features) split into views.
    k : int

    Notes
    -----
    :meth:`prior_summary` gives each hyperparameter per factor and view,
    ``[k, n_views, ...]``.
    """

    def __init__(self, family: type[PriorFamily], views: FeatureViews, k: int):
        super().__init__(views.n_features, k)
        self.views = views
        self.parts = torch.nn.ModuleList(family(size, k) for size in views.sizes())
        self.name = family.name
        self.support = family.support
        self.sign_symmetric = family.sign_symmetric
        self.widens = family.widens
        self._share_active()

    def _share_active(self) -> None:
        """Every view's family switches factors with the one ``active`` buffer."""
        for part in self.parts:
            part._buffers["active"] = self.active
            # saved once, as the family's own ``active`` (a copy per view would be
            # loaded after it, over it)
            part._non_persistent_buffers_set.add("active")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # states saved before the views' ``active`` was saved once held a copy per view
        for v in range(len(self.parts)):
            state_dict.pop(f"{prefix}parts.{v}.active", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._share_active()  # moving to a device made one copy per module
        return out

    # -- parameters ---------------------------------------------------------------
    def variational_parameters(self):
        return [prm for part in self.parts for prm in part.variational_parameters()]

    def prior_parameters(self):
        return [prm for part in self.parts for prm in part.prior_parameters()]

    def location_parameters(self):
        return [prm for part in self.parts for prm in part.location_parameters()]

    def _whole(self, rows) -> None:
        if rows is not None:
            raise ValueError("a view family is on the features: its rows are taken whole")

    # -- what the model needs -------------------------------------------------------
    def moments(self, rows=None, sparse=False) -> Moments:
        self._whole(rows)
        parts = [part.moments() for part in self.parts]
        return Moments(*(self.views.join([m[i] for m in parts], 0) for i in range(2)))

    def kl(self, rows=None, sparse=False) -> torch.Tensor:
        self._whole(rows)
        return sum(part.kl() for part in self.parts)

    def kl_by_view(self) -> torch.Tensor:
        """``sum KL(q || g)`` over each view's entries, ``[n_views]``."""
        return torch.stack([part.kl() for part in self.parts])

    def kl_entries(self, rows=None, sparse=False) -> torch.Tensor:
        self._whole(rows)
        return self.views.join([part.kl_entries() for part in self.parts], 0)

    @property
    def pip(self) -> torch.Tensor:
        return self.views.join([part.pip for part in self.parts], 0)

    @torch.no_grad()
    def sample(self, generator=None, rows=None) -> torch.Tensor:
        self._whole(rows)
        return self.views.join([part.sample(generator) for part in self.parts], 0)

    @torch.no_grad()
    def draw(self, n_draws, generator=None) -> dict:
        parts = [part.draw(n_draws, generator) for part in self.parts]
        return {key: self.views.join([d[key] for d in parts], 1) for key in parts[0]}

    @torch.no_grad()
    def log_density(self, latent, prior) -> torch.Tensor:
        split = {key: self.views.split(value, 1) for key, value in latent.items()}
        return self.views.join(
            [
                part.log_density({key: value[v] for key, value in split.items()}, prior)
                for v, part in enumerate(self.parts)
            ],
            1,
        )

    # -- start and empirical Bayes -------------------------------------------------------
    def _per_view(self, values):
        """``values`` of every feature cut into the views; one row (a scale per factor,
        as the streamed start gives) goes to every view alike."""
        if values.shape[0] == self.m:
            return self.views.split(values, 0)
        return [values] * len(self.parts)

    def start_prior_(self, values):
        for part, v in zip(self.parts, self._per_view(values), strict=True):
            part.start_prior_(v)

    def start_(self, values, precision, rows=None):
        self._whole(rows)
        pairs = zip(self._per_view(values), self._per_view(precision), strict=True)
        for part, (v, prec) in zip(self.parts, pairs, strict=True):
            part.start_(v, prec)

    def start_posterior_(self, values, precision, rows=None):
        self._whole(rows)
        pairs = zip(self._per_view(values), self._per_view(precision), strict=True)
        for part, (v, prec) in zip(self.parts, pairs, strict=True):
            part.start_posterior_(v, prec)

    def update_prior_(self):
        for part in self.parts:
            part.update_prior_()

    def prior_precision(self):
        """Each feature's prior precision per factor, its view's, ``[m, k]`` (the families'
        own is ``[k]``: a view family's differs between views)."""
        return self.views.join(
            [part.prior_precision().expand(part.m, self.k) for part in self.parts], 0
        )

    def prior_summary(self):
        parts = [part.prior_summary() for part in self.parts]
        return {key: torch.stack([s[key] for s in parts], 1) for key in parts[0]}

    def posterior(self, extra_var=None):
        extra = [None] * len(self.parts)
        if extra_var is not None:
            if np.shape(extra_var) != (self.m, self.k):
                raise ValueError(f"extra_var must be of shape {(self.m, self.k)}")
            extra = self.views.split(np.asarray(extra_var), 0)
        posts = [part.posterior(e) for part, e in zip(self.parts, extra, strict=True)]
        cls = type(posts[0])
        return cls(*(self.views.join([getattr(p, f) for p in posts], 0) for f in cls.fields))

    # -- shared -----------------------------------------------------------------------
    @torch.no_grad()
    def permute_(self, order):
        for part in self.parts:
            part._permute_own_(order)
        self.active.copy_(self.active[order])

    @torch.no_grad()
    def flip_(self, signs):
        for part in self.parts:
            part.flip_(signs)

    def extra_repr(self) -> str:
        return f"{self.name}, {self.views!r}, k={self.k}"
