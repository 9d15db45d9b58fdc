"""Views: a partition of the features into groups measured alike (RNA, protein, ...).

A multi-view fit (MOFA+'s setting) has one likelihood per view
(:class:`spfa.likelihoods.Views`) and, on the factors' side, one prior per view
and factor (:class:`spfa.priors.ViewFamily`), so that a factor can be active in
one view and absent from another; the loadings ``L`` are shared by every view.
:class:`FeatureViews` is the partition both use: which view each feature belongs
to, and the splitting of a feature axis into views and back.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["FeatureViews", "size_grid"]


class FeatureViews:
    """The features ``0..p-1`` split into named views.

    Parameters
    ----------
    groups : array-like of shape (p,)
        The view of each feature, by name.
    names : sequence of str
        Every view's name, in the order of the model's views (e.g. the keys of the
        likelihood dictionary). Each must own at least one feature, and every
        feature's view must be one of them.

    Attributes
    ----------
    names : tuple of str
    of : ndarray of int, shape (p,)
        Each feature's view number.
    index : list of ndarray of int
        The features of each view, increasing.
    local : ndarray of int, shape (p,)
        Each feature's position within its view.
    """

    def __init__(self, groups, names: Sequence[str]):
        names = tuple(str(v) for v in names)
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"the views need distinct names, got {list(names)}")
        groups = np.asarray(groups)
        if groups.ndim != 1:
            raise ValueError(
                f"feature_groups must be 1-D (one view name per feature), got shape {groups.shape}"
            )
        groups = groups.astype(str)
        unknown = sorted(set(groups.tolist()) - set(names))
        if unknown:
            raise ValueError(
                f"feature_groups names views {unknown} that have no likelihood; the views "
                f"are {list(names)}"
            )
        self.names = names
        levels, codes = np.unique(groups, return_inverse=True)
        self.of = np.array([names.index(v) for v in levels.tolist()], dtype=np.int64)[codes]
        self.index = [np.flatnonzero(self.of == v) for v in range(len(names))]
        empty = [names[v] for v, idx in enumerate(self.index) if idx.size == 0]
        if empty:
            raise ValueError(f"views {empty} have no features in feature_groups")
        self.local = np.empty(groups.size, dtype=np.int64)
        for idx in self.index:
            self.local[idx] = np.arange(idx.size)
        #: features in view order (view 0's, then view 1's, ...) and back
        self.order = np.concatenate(self.index)
        self.inverse = np.argsort(self.order)
        #: the views are consecutive blocks of the features, in their order (RNA, then
        #: protein): tensors are split into views of their memory and joined by one copy
        self.contiguous = bool(np.array_equal(self.order, np.arange(self.order.size)))
        self._torch: dict = {}

    @property
    def n_views(self) -> int:
        return len(self.names)

    @property
    def n_features(self) -> int:
        return self.of.size

    @property
    def groups(self) -> np.ndarray:
        """Each feature's view name, ``(p,)``."""
        return np.asarray(self.names, dtype=object)[self.of].astype(str)

    def sizes(self) -> list[int]:
        return [idx.size for idx in self.index]

    def tensors(self, device) -> dict:
        """The index arrays as long tensors on ``device`` (cached per device)."""
        key = str(device)
        if key not in self._torch:
            as_long = lambda a: torch.as_tensor(a, dtype=torch.long, device=device)  # noqa: E731
            self._torch[key] = {
                "index": [as_long(idx) for idx in self.index],
                "of": as_long(self.of),
                "local": as_long(self.local),
                "inverse": as_long(self.inverse),
            }
        return self._torch[key]

    # -- a feature axis split into views and joined back ----------------------------
    def split(self, values, axis: int = -1) -> list:
        """``values`` (numpy or torch) cut along ``axis`` (of length ``p``) into the views'
        features."""
        if isinstance(values, torch.Tensor):
            if self.contiguous:  # no copies
                return list(torch.split(values, self.sizes(), dim=axis))
            index = self.tensors(values.device)["index"]
            return [values.index_select(axis, idx) for idx in index]
        return [np.take(values, idx, axis=axis) for idx in self.index]

    def join(self, parts: Sequence, axis: int = -1):
        """Inverse of :meth:`split`: the views' parts back on one feature axis."""
        if isinstance(parts[0], torch.Tensor):
            joined = torch.cat(list(parts), axis)
            if self.contiguous:
                return joined
            return joined.index_select(axis, self.tensors(parts[0].device)["inverse"])
        return np.take(np.concatenate(list(parts), axis=axis), self.inverse, axis=axis)

    def entry_views(self, cols: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For entries at features ``cols`` (``[m]``): per view, the positions of its
        entries in the list and their features' positions within the view."""
        t = self.tensors(cols.device)
        view = t["of"][cols]
        out = []
        for v in range(self.n_views):
            at = torch.nonzero(view == v).squeeze(-1)
            out.append((at, t["local"][cols[at]]))
        return out

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}: {s}" for n, s in zip(self.names, self.sizes(), strict=True))
        return f"FeatureViews({sizes})"


def size_grid(s: np.ndarray, likelihood) -> np.ndarray:
    """Size factors as an array that broadcasts over the ``(n, p)`` data: ``(n, 1)``
    from one per row, ``(n, p)`` from a multi-view fit's one per row and view
    ``(n, n_views)`` (each feature takes its view's)."""
    s = np.asarray(s, dtype=float)
    if s.ndim == 1:
        return s[:, None]
    return s[:, likelihood.views.of]
