"""Matplotlib views of a fit: truth against estimate, credible intervals, PIP
calibration, ELBO trace, support-recovery curves, accuracy against time; and,
for a fit on real data (a fitted estimator or an AnnData written by
``spfa.anndata.fit``), top features, loadings, factor contributions, the ELBO
and an overview figure of all four.

Every function draws on the ``ax`` (or axes) it is given and returns it, so the
views compose into any figure. pyplot is imported only by a function asked to
make its own figure (``ax=None``); :func:`plot_overview` builds a
:class:`matplotlib.figure.Figure` without it.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve

from .evaluation import Calibration

__all__ = [
    "plot_truth_vs_estimate",
    "plot_intervals",
    "plot_calibration",
    "plot_elbo_trace",
    "plot_support_curves",
    "plot_accuracy_vs_time",
    "plot_top_features",
    "plot_loadings",
    "plot_factor_contribution",
    "plot_elbo",
    "plot_overview",
]


def plot_truth_vs_estimate(axes, truth, estimate, pip=None, label="L"):
    """One scatter per factor of the true against the (matched, aligned) estimate.

    Parameters
    ----------
    axes : sequence of k matplotlib Axes
    truth, estimate : ndarray of shape (m, k)
    pip : ndarray of shape (m, k), optional
        Colours the points by PIP.
    label : str
    """
    for t, ax in enumerate(axes):
        c = None if pip is None else pip[:, t]
        sc = ax.scatter(truth[:, t], estimate[:, t], c=c, s=6, cmap="viridis", vmin=0, vmax=1, lw=0)
        lim = np.abs(np.concatenate([truth[:, t], estimate[:, t]])).max() * 1.05 or 1.0
        ax.plot([-lim, lim], [-lim, lim], color="0.6", lw=0.8, zorder=0)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_title(f"{label}, factor {t + 1}", fontsize=9)
        ax.set_xlabel(f"true {label}", fontsize=8)
        ax.set_ylabel(f"E[{label}]", fontsize=8)
    return sc


def plot_calibration(ax, cal: Calibration | dict, label=None, min_count=50, **kw):
    """Fraction truly non-zero against mean PIP per bin; hollow markers hold < ``min_count``."""
    if isinstance(cal, dict):
        cal = Calibration(**{k: np.asarray(v, dtype=float) for k, v in cal.items()})
    ok = cal.count >= min_count
    (line,) = ax.plot(cal.mean_pip[ok], cal.fraction_nonzero[ok], "o-", label=label, **kw)
    ax.plot(cal.mean_pip[~ok], cal.fraction_nonzero[~ok], "o", mfc="none", color=line.get_color())
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, zorder=0)
    ax.fill_between([0, 1], [-0.1, 0.9], [0.1, 1.1], color="0.9", zorder=-1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("PIP (bin mean)")
    ax.set_ylabel("fraction truly non-zero")
    return ax


def plot_elbo_trace(axes, history):
    """ELBO per step (left) and its terms (right): err and the KLs, per observed step.

    Parameters
    ----------
    axes : two matplotlib Axes
    history : dict with "elbo", "err", "kl_l", "kl_f" (and optionally "kl_b")
    """
    steps = np.arange(1, len(history["elbo"]) + 1)
    axes[0].plot(steps, history["elbo"], lw=0.8)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("ELBO")
    axes[0].set_xscale("log")
    for key in ("err", "kl_l", "kl_f", "kl_b"):
        if key in history and len(history[key]):
            values = np.asarray(history[key], dtype=float)
            values = -values if key == "err" else values
            axes[1].plot(
                steps, values, lw=0.8, label="−err (neg. exp. log-lik)" if key == "err" else key
            )
    axes[1].set_yscale("log")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=7)
    return axes


def plot_support_curves(ax, curves):
    """Precision-recall curves of support recovery.

    Parameters
    ----------
    curves : dict label -> (score, truth)
        Pooled scores (PIP or ``|estimate|``) and true coefficients.
    """
    for label, (score, truth) in curves.items():
        positive = np.ravel(truth) != 0
        precision, recall, _ = precision_recall_curve(positive, np.ravel(score))
        ap = average_precision_score(positive, np.ravel(score))
        ax.step(recall, precision, where="post", label=f"{label} (AP {ap:.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    return ax


def plot_accuracy_vs_time(ax, rows, metric="error"):
    """One point per method (mean over replicates): ``metric`` against wall time.

    Parameters
    ----------
    rows : list of dict
        ``method``, ``status``, ``seconds`` and ``metric`` (benchmark CSV rows).
    """
    methods = dict.fromkeys(r["method"] for r in rows)
    for method in methods:
        ok = [r for r in rows if r["method"] == method and r["status"] == "ok"]
        if not ok:
            continue
        t = np.mean([float(r["seconds"]) for r in ok])
        m = np.mean([float(r[metric]) for r in ok])
        ax.plot(t, m, "o", label=method)
        ax.annotate(method, (t, m), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel(metric.replace("_", " "))
    return ax


def plot_intervals(ax, truth, mean, lower, upper, max_points=150):
    """Credible intervals of one column against the truth, sorted by the truth.

    Each entry is a vertical bar from ``lower`` to ``upper`` with a dot at the
    posterior ``mean``; the truth is a black tick. Bars that miss the truth
    are red. At most ``max_points`` entries are drawn (the true non-zeros
    first, then evenly spaced zeros).

    Parameters
    ----------
    ax : matplotlib Axes
    truth, mean, lower, upper : ndarray of shape (m,)

    Returns
    -------
    float
        Share of all ``m`` entries whose interval holds the truth.
    """
    truth, mean = np.asarray(truth, float), np.asarray(mean, float)
    lower, upper = np.asarray(lower, float), np.asarray(upper, float)
    inside = (lower <= truth) & (truth <= upper)
    nonzero, zero = np.flatnonzero(truth != 0), np.flatnonzero(truth == 0)
    room = max(max_points - nonzero.size, 0)
    if zero.size > room:
        zero = zero[np.linspace(0, zero.size - 1, room).astype(int)] if room else zero[:0]
    shown = np.concatenate([nonzero, zero])[:max_points]
    shown = shown[np.argsort(truth[shown], kind="stable")]
    x = np.arange(shown.size)
    colour = np.where(inside[shown], "tab:blue", "tab:red")
    ax.vlines(x, lower[shown], upper[shown], colors=colour, lw=1.0)
    ax.scatter(x, mean[shown], s=5, c=colour, zorder=3, lw=0)
    ax.scatter(x, truth[shown], s=14, marker="_", c="k", zorder=4, lw=1.0)
    ax.set_xticks([])
    ax.set_xlabel("entries, sorted by the true value")
    return float(inside.mean())


# --- views of one fit on real data: a fitted estimator or an AnnData --------------------------

_PRUNED_COLOUR = "0.75"
_KEPT_COLOUR = "tab:blue"
_DIVERGING = "RdBu_r"


class _FitSummary(NamedTuple):
    """What the views of one fit need, from an estimator or an AnnData alike.

    Attributes
    ----------
    factors : ndarray of shape (p, k)
        ``E[F]``.
    factors_pip : ndarray of shape (p, k)
    loadings : ndarray of shape (n, k)
        ``E[L]``.
    feature_names : ndarray of str, shape (p,)
    elbo : ndarray of shape (records,)
    contribution : ndarray of shape (k,)
        ELBO lost (nats) without each factor.
    active : ndarray of bool, shape (k,)
        Kept factors.
    """

    factors: np.ndarray
    factors_pip: np.ndarray
    loadings: np.ndarray
    feature_names: np.ndarray
    elbo: np.ndarray
    contribution: np.ndarray
    active: np.ndarray


def _is_anndata(source) -> bool:
    return hasattr(source, "obsm") and hasattr(source, "uns")


def _summary(source, key="spfa") -> _FitSummary:
    """One :class:`_FitSummary` of a fitted estimator or of an AnnData written with ``key``
    (a summary is returned as it is)."""
    if isinstance(source, _FitSummary):
        return source
    if _is_anndata(source):
        obsm_key, factors_key, pip_key = f"X_{key}", f"{key}_factors", f"{key}_pip"
        hint = "run spfa.anndata.fit first (or pass key=...)"
        if obsm_key not in source.obsm:
            raise ValueError(f"adata has no obsm[{obsm_key!r}]: {hint}")
        for name in (factors_key, pip_key):
            if name not in source.varm:
                raise ValueError(f"adata has no varm[{name!r}]: {hint}")
        if key not in source.uns:
            raise ValueError(f"adata has no uns[{key!r}]: {hint}")
        uns = source.uns[key]
        for name in ("elbo", "elbo_contribution", "active"):
            if name not in uns:
                raise ValueError(f"adata.uns[{key!r}] has no {name!r}: {hint}")
        summary = _FitSummary(
            factors=np.asarray(source.varm[factors_key], dtype=float),
            factors_pip=np.asarray(source.varm[pip_key], dtype=float),
            loadings=np.asarray(source.obsm[obsm_key], dtype=float),
            feature_names=np.asarray(source.var_names, dtype=object).astype(str),
            elbo=np.asarray(uns["elbo"], dtype=float).ravel(),
            contribution=np.asarray(uns["elbo_contribution"], dtype=float).ravel(),
            active=np.asarray(uns["active"], dtype=bool).ravel(),
        )
    elif hasattr(source, "components_"):
        factors = np.asarray(source.components_, dtype=float).T
        names = getattr(source, "feature_names_in_", None)
        if names is None:
            names = [f"feature {j}" for j in range(factors.shape[0])]
        summary = _FitSummary(
            factors=factors,
            factors_pip=np.asarray(source.factors_pip_, dtype=float),
            loadings=np.asarray(source.loadings_, dtype=float),
            feature_names=np.asarray(names, dtype=object).astype(str),
            elbo=np.asarray(source.history_.get("elbo", []), dtype=float).ravel(),
            contribution=np.asarray(source.elbo_contribution_, dtype=float).ravel(),
            active=np.asarray(source.active_components_, dtype=bool).ravel(),
        )
    else:
        raise ValueError(
            f"expected a fitted SparseFactorAnalysis or an AnnData written by spfa.anndata.fit, "
            f"got {type(source).__name__} without components_ (call fit first)"
        )
    p, k = summary.factors.shape
    shapes = {
        "factors_pip": (summary.factors_pip.shape, (p, k)),
        "loadings": (summary.loadings.shape[1:], (k,)),
        "feature_names": (summary.feature_names.shape, (p,)),
        "elbo_contribution": (summary.contribution.shape, (k,)),
        "active": (summary.active.shape, (k,)),
    }
    for name, (got, want) in shapes.items():
        if got != want:
            raise ValueError(f"{name} has shape {got}, expected {want} to match factors {(p, k)}")
    return summary


def _new_axes(figsize):
    """A fresh pyplot figure's Axes (pyplot is imported only here)."""
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _factor_labels(columns):
    return [str(int(t) + 1) for t in columns]


def _label_size(n_labels, largest=9.0, smallest=5.5):
    """Tick font size that lets ``n_labels`` labels share one axis."""
    return float(np.clip(largest * 30 / max(n_labels, 30), smallest, largest))


def _empty(ax, message):
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def _top_rows(summary: _FitSummary, n_top, min_pip) -> np.ndarray:
    """Union, in factor order, of each kept factor's ``n_top`` features with PIP >= ``min_pip``
    ranked by ``|E[F]|``, as feature indices of shape (rows,)."""
    if isinstance(n_top, bool) or not isinstance(n_top, numbers.Integral) or n_top < 1:
        raise ValueError(f"n_top must be an integer >= 1, got {n_top!r}")
    if not (isinstance(min_pip, numbers.Real) and 0 <= min_pip <= 1):
        raise ValueError(f"min_pip must lie in [0, 1], got {min_pip!r}")
    rows = {}
    for t in np.flatnonzero(summary.active):
        keep = np.flatnonzero(summary.factors_pip[:, t] >= min_pip)
        ranked = keep[np.argsort(-np.abs(summary.factors[keep, t]), kind="stable")][:n_top]
        rows.update(dict.fromkeys(int(j) for j in ranked))
    return np.fromiter(rows, dtype=int, count=len(rows))


def plot_top_features(source, n_top=5, *, key="spfa", min_pip=0.5, ax=None):
    """Heatmap of the top features of each kept factor: ``E[F]`` of genes by factors.

    For each kept factor its ``n_top`` features with PIP >= ``min_pip``,
    ranked by ``|E[f_jk]|``, are taken; the rows are their union in factor
    order, the columns the kept factors. The colour is ``E[F]`` on a
    diverging scale centred at 0; a dot marks each entry with PIP >= ``min_pip``.

    Parameters
    ----------
    source : SparseFactorAnalysis or anndata.AnnData
        A fitted estimator, or an AnnData written by ``spfa.anndata.fit``.
    n_top : int, default=5
        At most this many features per factor.
    key : str, default="spfa"
        The AnnData's key (``key_added`` of the fit); ignored for an estimator.
    min_pip : float in [0, 1], default=0.5
    ax : matplotlib Axes, optional
        Drawn on; a new figure when None.

    Returns
    -------
    matplotlib Axes
        Its image holds ``E[F]`` of shape (rows, kept factors).
    """
    summary = _summary(source, key)
    rows = _top_rows(summary, n_top, min_pip)
    kept = np.flatnonzero(summary.active)
    if ax is None:
        ax = _new_axes((1.6 + 0.45 * max(kept.size, 1), 1.5 + 0.16 * max(rows.size, 5)))
    if kept.size == 0:
        return _empty(ax, "no kept factor")
    if rows.size == 0:
        return _empty(ax, f"no kept factor has a feature with PIP >= {min_pip:g}")
    values = summary.factors[np.ix_(rows, kept)]
    limit = float(np.abs(values).max()) or 1.0
    image = ax.imshow(
        values,
        cmap=_DIVERGING,
        vmin=-limit,
        vmax=limit,
        aspect="auto",
        interpolation="nearest",
    )
    marked_row, marked_col = np.nonzero(summary.factors_pip[np.ix_(rows, kept)] >= min_pip)
    ax.scatter(marked_col, marked_row, s=4, c="k", lw=0, label=f"PIP ≥ {min_pip:g}")
    ax.set_xticks(np.arange(kept.size), labels=_factor_labels(kept), fontsize=8)
    ax.set_yticks(np.arange(rows.size), labels=summary.feature_names[rows])
    ax.tick_params(axis="y", labelsize=_label_size(rows.size), length=0)
    ax.set_xlabel("factor")
    ax.set_title(f"top features (dot: PIP ≥ {min_pip:g})", fontsize=9)
    colourbar = ax.figure.colorbar(image, ax=ax, shrink=0.6, aspect=30, pad=0.02)
    colourbar.set_label("E[F]", fontsize=8)
    colourbar.ax.tick_params(labelsize=7)
    return ax


def _obs_column(source, groupby):
    """``groupby`` itself, or the ``adata.obs`` column it names."""
    if not isinstance(groupby, str):
        return groupby
    if not _is_anndata(source):
        raise ValueError(
            f"groupby={groupby!r} names an obs column, which needs an AnnData; "
            "pass an array of n group labels instead"
        )
    if groupby not in source.obs.columns:
        raise ValueError(f"groupby={groupby!r} is not a column of adata.obs")
    return source.obs[groupby]


def _groups(source, groupby, n):
    """Integer group codes (n,) and their names, in display order, of ``groupby``."""
    groupby = _obs_column(source, groupby)
    if hasattr(groupby, "cat"):  # pandas categorical: keep the order of its categories
        codes = np.asarray(groupby.cat.codes, dtype=int)
        names = [str(c) for c in groupby.cat.categories]
        if (codes < 0).any():
            codes = np.where(codes < 0, len(names), codes)
            names.append("nan")
        names = np.asarray(names, dtype=object)
    else:
        labels = np.asarray(groupby, dtype=object)
        if labels.ndim != 1:
            raise ValueError(f"groupby must be 1-D, got shape {labels.shape}")
        names, codes = np.unique(labels.astype(str), return_inverse=True)
    if codes.shape != (n,):
        raise ValueError(f"groupby has {codes.shape[0]} labels, expected one per cell ({n})")
    return codes.ravel(), names


def _cell_order(loadings, codes=None) -> np.ndarray:
    """Cells ordered by group, then dominant factor, then that factor's loading (descending).

    The dominant factor of a cell is its largest ``|E[l_ik]|`` once each
    factor's column is scaled by its largest ``|E[l_ik]|``.
    """
    scale = np.abs(loadings).max(axis=0)
    scaled = loadings / np.where(scale > 0, scale, 1.0)
    dominant = np.abs(scaled).argmax(axis=1)
    value = np.take_along_axis(scaled, dominant[:, None], axis=1)[:, 0]
    keys = [-value, dominant]
    if codes is not None:
        keys.append(codes)
    return np.lexsort(keys)


def plot_loadings(source, *, key="spfa", groupby=None, ax=None, max_cells=2000):
    """Heatmap of ``E[L]``, cells by kept factors, cells ordered by their dominant factor.

    A cell's dominant factor is its largest ``|E[l_ik]|`` after each
    factor's column is scaled by its largest ``|E[l_ik]|``; cells are ordered
    by it and, within, by that (scaled) loading, largest first. With
    ``groupby`` cells are ordered by group first, and the groups are
    separated by lines and named on the cell axis.

    Parameters
    ----------
    source : SparseFactorAnalysis or anndata.AnnData
        A fitted estimator, or an AnnData written by ``spfa.anndata.fit``.
    key : str, default="spfa"
        The AnnData's key (``key_added`` of the fit); ignored for an estimator.
    groupby : str or array-like of shape (n,), optional
        A column of ``adata.obs`` (an AnnData only; categorical or string),
        or one group label per cell. A categorical keeps its categories'
        order; other labels are sorted.
    ax : matplotlib Axes, optional
        Drawn on; a new figure when None.
    max_cells : int, default=2000
        At most this many cells are drawn, evenly spaced along the order.

    Returns
    -------
    matplotlib Axes
        Its image holds ``E[L]`` of shape (drawn cells, kept factors).
    """
    if isinstance(max_cells, bool) or not isinstance(max_cells, numbers.Integral) or max_cells < 1:
        raise ValueError(f"max_cells must be an integer >= 1, got {max_cells!r}")
    summary = _summary(source, key)
    n = summary.loadings.shape[0]
    codes, names = (None, None) if groupby is None else _groups(source, groupby, n)
    kept = np.flatnonzero(summary.active)
    if ax is None:
        ax = _new_axes((2.0 + 0.45 * max(kept.size, 1), 6.0))
    if kept.size == 0:
        return _empty(ax, "no kept factor")
    loadings = summary.loadings[:, kept]
    order = _cell_order(loadings, codes)
    if n > max_cells:
        order = order[np.round(np.linspace(0, n - 1, max_cells)).astype(int)]
    values = loadings[order]
    limit = float(np.quantile(np.abs(values), 0.995)) or float(np.abs(values).max()) or 1.0
    image = ax.imshow(
        values,
        cmap=_DIVERGING,
        vmin=-limit,
        vmax=limit,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_xticks(np.arange(kept.size), labels=_factor_labels(kept), fontsize=8)
    ax.set_xlabel("factor")
    shown = f"{order.size} of {n} cells" if order.size < n else f"{n} cells"
    if codes is None:
        ax.set_yticks([])
        ax.set_ylabel("cells")
    else:
        drawn = codes[order]
        starts = np.flatnonzero(np.r_[True, drawn[1:] != drawn[:-1]])
        ends = np.r_[starts[1:], drawn.size]
        for start in starts[1:]:
            ax.axhline(start - 0.5, color="k", lw=0.6)
        ax.set_yticks((starts + ends - 1) / 2, labels=names[drawn[starts]])
        ax.tick_params(axis="y", labelsize=_label_size(starts.size), length=0)
    ax.set_title(f"loadings E[L] ({shown})", fontsize=9)
    colourbar = ax.figure.colorbar(image, ax=ax, shrink=0.6, aspect=30, pad=0.02, extend="both")
    colourbar.set_label("E[L]", fontsize=8)
    colourbar.ax.tick_params(labelsize=7)
    return ax


def plot_factor_contribution(source, *, key="spfa", ax=None):
    """Bar chart of the ELBO each factor contributes (nats lost without it).

    Kept factors are coloured, pruned ones grey.

    Parameters
    ----------
    source : SparseFactorAnalysis or anndata.AnnData
        A fitted estimator, or an AnnData written by ``spfa.anndata.fit``.
    key : str, default="spfa"
        The AnnData's key (``key_added`` of the fit); ignored for an estimator.
    ax : matplotlib Axes, optional
        Drawn on; a new figure when None.

    Returns
    -------
    matplotlib Axes
        One bar per factor, ``k`` in all.
    """
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    summary = _summary(source, key)
    k = summary.contribution.size
    if ax is None:
        ax = _new_axes((max(4.0, 1.5 + 0.25 * k), 3.0))
    x = np.arange(1, k + 1)
    colours = np.where(summary.active, _KEPT_COLOUR, _PRUNED_COLOUR)
    ax.bar(x, summary.contribution, color=colours, width=0.8)
    ax.axhline(0.0, color="0.3", lw=0.6)
    pruned = ~summary.active
    if pruned.any():  # a pruned factor's bar is about 0 high: mark where it is
        ax.scatter(x[pruned], summary.contribution[pruned], marker="x", s=12, color="0.5", lw=0.8)
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, -0.03 * (high - low)), high)
    if k <= 25:
        ax.set_xticks(x)
        ax.tick_params(axis="x", labelsize=_label_size(k, largest=8.0, smallest=6.0))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.4, k + 0.6)
    ax.set_xlabel("factor")
    ax.set_ylabel("ELBO contribution (nats)")
    kept = int(summary.active.sum())
    ax.set_title(f"factor contributions ({kept} of {k} kept)", fontsize=9)
    if kept < k:
        handles = [
            Patch(color=_KEPT_COLOUR, label="kept"),
            Patch(color=_PRUNED_COLOUR, label="pruned"),
        ]
        ax.legend(handles=handles, fontsize=7, frameon=False)
    return ax


def plot_elbo(source, *, key="spfa", ax=None):
    """The ELBO against pass (or record) index, on a log x axis.

    The y axis is linear; its lower limit leaves out the first 2% of the
    records when they would flatten the rest of the curve.

    Parameters
    ----------
    source : SparseFactorAnalysis or anndata.AnnData
        A fitted estimator, or an AnnData written by ``spfa.anndata.fit``.
    key : str, default="spfa"
        The AnnData's key (``key_added`` of the fit); ignored for an estimator.
    ax : matplotlib Axes, optional
        Drawn on; a new figure when None.

    Returns
    -------
    matplotlib Axes
        One line of ``records`` points.
    """
    summary = _summary(source, key)
    if ax is None:
        ax = _new_axes((4.5, 3.0))
    elbo = summary.elbo
    finite = np.isfinite(elbo)
    if not finite.any():
        return _empty(ax, "no ELBO recorded")
    steps = np.arange(1, elbo.size + 1)
    ax.plot(steps, elbo, lw=1.0, color=_KEPT_COLOUR)
    ax.set_xscale("log")
    late = elbo[int(0.02 * elbo.size) :]
    late = late[np.isfinite(late)]
    low, high = elbo[finite].min(), elbo[finite].max()
    if late.size and late.min() > low:
        low = late.min()
        pad = 0.05 * (high - low) or 1.0
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("pass")
    ax.set_ylabel("ELBO")
    ax.set_title(f"ELBO (final {elbo[finite][-1]:.6g})", fontsize=9)
    return ax


def plot_overview(source, *, key="spfa", groupby=None, n_top=5):
    """One figure of a fit: top features, loadings, factor contributions and the ELBO.

    Built on :class:`matplotlib.figure.Figure` without pyplot, so it works
    headless; save it with ``fig.savefig(path)``.

    Parameters
    ----------
    source : SparseFactorAnalysis or anndata.AnnData
        A fitted estimator, or an AnnData written by ``spfa.anndata.fit``.
    key : str, default="spfa"
        The AnnData's key (``key_added`` of the fit); ignored for an estimator.
    groupby : str or array-like of shape (n,), optional
        Groups of cells for the loadings (see :func:`plot_loadings`).
    n_top : int, default=5
        Top features per factor (see :func:`plot_top_features`).

    Returns
    -------
    matplotlib.figure.Figure
        Four Axes: top features, loadings, contributions, ELBO (plus two colourbars).
    """
    from matplotlib.figure import Figure

    summary = _summary(source, key)
    groupby = _obs_column(source, groupby)
    rows = _top_rows(summary, n_top, 0.5)
    kept = int(summary.active.sum())
    width = float(np.clip(8.0 + 0.3 * kept, 10.0, 18.0))
    height = float(np.clip(3.5 + 0.16 * rows.size, 8.0, 18.0))
    fig = Figure(figsize=(width, height), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=(2.6, 1.0), width_ratios=(1.0, 1.0))
    plot_top_features(summary, n_top, ax=fig.add_subplot(grid[0, 0]))
    plot_loadings(summary, groupby=groupby, ax=fig.add_subplot(grid[0, 1]))
    plot_factor_contribution(summary, ax=fig.add_subplot(grid[1, 0]))
    plot_elbo(summary, ax=fig.add_subplot(grid[1, 1]))
    return fig
