"""Matplotlib views of a fit: truth against estimate, credible intervals, PIP
calibration, ELBO trace, support-recovery curves, accuracy against time.

Every function draws on the ``ax`` (or axes) it is given and returns it, so the
views compose into any figure; this module never imports pyplot itself.
"""

from __future__ import annotations

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
